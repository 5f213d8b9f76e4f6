// Max-pooling of (N, H, W, C) arrays (channels-last memory: C innermost) over kh x kw windows
// with stride (sh, sw): output (N, OH, OW, C). A window's offset (p, q) is k = p * kw + q;
// the arg-max arrays A are signed char (windows under 128 elements) or int, as in the
// reference, hence the _i8 / _i32 kernel pairs. One thread per output (or input) element.

// x index of pixel (r, s) of image n, channel ch.
__device__ __forceinline__ long long pixel_index(long long n, long long r, long long s,
                                                 long long ch, long long h, long long w,
                                                 long long c) {
    return ((n * h + r) * w + s) * c + ch;
}

// y = max over window (i, j) of x, argmax = the first offset k holding it; NaN propagates to y
// as in NumPy's maximum (the arg-max then stays on the last larger value before it).
template <typename T, typename A>
__device__ __forceinline__ void maxpool_argmax(const T* x, T* y, A* argmax, long long n_,
                                               long long c, long long h, long long w,
                                               long long oh, long long ow, long long kh,
                                               long long kw, long long sh, long long sw) {
    const long long total = n_ * oh * ow * c;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)blockDim.x * gridDim.x) {
        const long long ch = o % c, j = (o / c) % ow, i = (o / (c * ow)) % oh;
        const long long n = o / (c * ow * oh);
        T best = x[pixel_index(n, i * sh, j * sw, ch, h, w, c)];
        long long arg = 0;
        for (long long p = 0; p < kh; ++p) {
            for (long long q = 0; q < kw; ++q) {
                const T v = x[pixel_index(n, i * sh + p, j * sw + q, ch, h, w, c)];
                if (v > best) {  // strictly: a tie keeps the earlier offset
                    best = v;
                    arg = p * kw + q;
                } else if (v != v) {
                    best = v;
                }
            }
        }
        y[o] = best;
        argmax[o] = (A)arg;
    }
}

// gx[n, r, s, ch] = sum over the windows (i, j) holding pixel (r, s), at offset
// k = (r - i*sh) * kw + (s - j*sw), of gy[n, i, j, ch] * [argmax[n, i, j, ch] == k]: each
// pixel gathers its windows' gradients (no atomics), as the reference adds them: offsets in
// increasing order (i, j decreasing), every window's gy times its 0/1 mask.
template <typename T, typename A>
__device__ __forceinline__ void maxpool_scatter(const T* gy, const A* argmax, T* gx, long long n_,
                                                long long c, long long h, long long w,
                                                long long oh, long long ow, long long kh,
                                                long long kw, long long sh, long long sw) {
    const long long total = n_ * h * w * c;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)blockDim.x * gridDim.x) {
        const long long ch = o % c, s = (o / c) % w, r = (o / (c * w)) % h;
        const long long n = o / (c * w * h);
        // Windows i with i*sh <= r < i*sh + kh, among 0 .. oh-1 (likewise j).
        const long long i_first = r >= kh ? (r - kh) / sh + 1 : 0;
        const long long j_first = s >= kw ? (s - kw) / sw + 1 : 0;
        const long long i_last = r / sh < oh - 1 ? r / sh : oh - 1;
        const long long j_last = s / sw < ow - 1 ? s / sw : ow - 1;
        T sum = T(0);
        for (long long i = i_last; i >= i_first; --i) {
            for (long long j = j_last; j >= j_first; --j) {
                const long long window = pixel_index(n, i, j, ch, oh, ow, c);
                const long long k = (r - i * sh) * kw + (s - j * sw);
                sum += gy[window] * T((long long)argmax[window] == k);
            }
        }
        gx[o] = sum;
    }
}

// y[n, i, j, ch] = sum over offsets k of x at offset k of window (i, j) times
// [argmax[n, i, j, ch] == k]: x at the arg-max, as the reference's masked sum gives it.
template <typename T, typename A>
__device__ __forceinline__ void maxpool_gather(const T* x, const A* argmax, T* y, long long n_,
                                               long long c, long long h, long long w,
                                               long long oh, long long ow, long long kh,
                                               long long kw, long long sh, long long sw) {
    const long long total = n_ * oh * ow * c;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)blockDim.x * gridDim.x) {
        const long long ch = o % c, j = (o / c) % ow, i = (o / (c * ow)) % oh;
        const long long n = o / (c * ow * oh);
        const long long arg = (long long)argmax[o];
        T sum = T(0);
        for (long long p = 0; p < kh; ++p) {
            for (long long q = 0; q < kw; ++q) {
                const T v = x[pixel_index(n, i * sh + p, j * sw + q, ch, h, w, c)];
                sum += v * T(arg == p * kw + q);
            }
        }
        y[o] = sum;
    }
}

// The kernels: each of the three above for a signed char and an int arg-max.

template <typename T>
__global__ void maxpool2d_argmax_i8(const T* x, T* y, signed char* argmax, long long n,
                                    long long c, long long h, long long w, long long oh,
                                    long long ow, long long kh, long long kw, long long sh,
                                    long long sw) {
    maxpool_argmax<T, signed char>(x, y, argmax, n, c, h, w, oh, ow, kh, kw, sh, sw);
}

template <typename T>
__global__ void maxpool2d_argmax_i32(const T* x, T* y, int* argmax, long long n, long long c,
                                     long long h, long long w, long long oh, long long ow,
                                     long long kh, long long kw, long long sh, long long sw) {
    maxpool_argmax<T, int>(x, y, argmax, n, c, h, w, oh, ow, kh, kw, sh, sw);
}

template <typename T>
__global__ void maxpool2d_scatter_i8(const T* gy, const signed char* argmax, T* gx, long long n,
                                     long long c, long long h, long long w, long long oh,
                                     long long ow, long long kh, long long kw, long long sh,
                                     long long sw) {
    maxpool_scatter<T, signed char>(gy, argmax, gx, n, c, h, w, oh, ow, kh, kw, sh, sw);
}

template <typename T>
__global__ void maxpool2d_scatter_i32(const T* gy, const int* argmax, T* gx, long long n,
                                      long long c, long long h, long long w, long long oh,
                                      long long ow, long long kh, long long kw, long long sh,
                                      long long sw) {
    maxpool_scatter<T, int>(gy, argmax, gx, n, c, h, w, oh, ow, kh, kw, sh, sw);
}

template <typename T>
__global__ void maxpool2d_gather_i8(const T* x, const signed char* argmax, T* y, long long n,
                                    long long c, long long h, long long w, long long oh,
                                    long long ow, long long kh, long long kw, long long sh,
                                    long long sw) {
    maxpool_gather<T, signed char>(x, argmax, y, n, c, h, w, oh, ow, kh, kw, sh, sw);
}

template <typename T>
__global__ void maxpool2d_gather_i32(const T* x, const int* argmax, T* y, long long n,
                                     long long c, long long h, long long w, long long oh,
                                     long long ow, long long kh, long long kw, long long sh,
                                     long long sw) {
    maxpool_gather<T, int>(x, argmax, y, n, c, h, w, oh, ow, kh, kw, sh, sw);
}
