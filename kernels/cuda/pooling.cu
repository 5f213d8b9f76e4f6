// Max-pooling of (N, H, W, C) arrays (channels-last memory: C innermost) over kh x kw windows
// with stride (sh, sw): output (N, OH, OW, C). A window's offset (p, q) is k = p * kw + q.
// The arg-max arrays hold k as int8, or as int32 for windows of 128+ elements (as the
// reference's): the kernels take their bytes, and wide = 1 for int32.

__device__ __forceinline__ long long offset_at(const signed char* argmax, long long wide,
                                               long long o) {
    return wide ? (long long)((const int*)argmax)[o] : (long long)argmax[o];
}

// Element (n, r, s, ch) of an (N, rows, cols, C) array.
__device__ __forceinline__ long long at(long long n, long long r, long long s, long long ch,
                                        long long rows, long long cols, long long c) {
    return ((n * rows + r) * cols + s) * c + ch;
}

// y = max over window (i, j) of x, argmax = the first offset k holding it (ties: the earlier);
// a NaN makes y NaN as in NumPy's maximum (the arg-max stays on the last larger value before).
template <typename T>
__global__ void maxpool2d_argmax(const T* x, T* y, signed char* argmax, long long wide,
                                 long long n_, long long c, long long h, long long w,
                                 long long oh, long long ow, long long kh, long long kw,
                                 long long sh, long long sw) {
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < n_ * oh * ow * c;
         o += (long long)blockDim.x * gridDim.x) {
        const long long ch = o % c, j = (o / c) % ow, i = (o / (c * ow)) % oh;
        const long long n = o / (c * ow * oh);
        T best = x[at(n, i * sh, j * sw, ch, h, w, c)];
        long long arg = 0;
        for (long long p = 0; p < kh; ++p) {
            for (long long q = 0; q < kw; ++q) {
                const T v = x[at(n, i * sh + p, j * sw + q, ch, h, w, c)];
                if (v > best) {
                    best = v;
                    arg = p * kw + q;
                } else if (v != v) {
                    best = v;
                }
            }
        }
        y[o] = best;
        if (wide) {
            ((int*)argmax)[o] = (int)arg;
        } else {
            argmax[o] = (signed char)arg;
        }
    }
}

// gx[n, r, s, ch] = sum over the windows (i, j) holding pixel (r, s), at offset
// k = (r - i*sh) * kw + (s - j*sw), of gy[n, i, j, ch] * [argmax[n, i, j, ch] == k]: each
// pixel gathers its windows' gradients (no atomics), as the reference adds them: offsets in
// increasing order (i, j decreasing), every window's gy times its 0/1 mask.
template <typename T>
__global__ void maxpool2d_scatter(const T* gy, const signed char* argmax, long long wide, T* gx,
                                  long long n_, long long c, long long h, long long w,
                                  long long oh, long long ow, long long kh, long long kw,
                                  long long sh, long long sw) {
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < n_ * h * w * c;
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
                const long long window = at(n, i, j, ch, oh, ow, c);
                const long long k = (r - i * sh) * kw + (s - j * sw);
                sum += gy[window] * T(offset_at(argmax, wide, window) == k);
            }
        }
        gx[o] = sum;
    }
}

// y[n, i, j, ch] = sum over offsets k of x at offset k of window (i, j) times
// [argmax[n, i, j, ch] == k]: x at the arg-max, as the reference's masked sum gives it.
template <typename T>
__global__ void maxpool2d_gather(const T* x, const signed char* argmax, long long wide, T* y,
                                 long long n_, long long c, long long h, long long w,
                                 long long oh, long long ow, long long kh, long long kw,
                                 long long sh, long long sw) {
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < n_ * oh * ow * c;
         o += (long long)blockDim.x * gridDim.x) {
        const long long ch = o % c, j = (o / c) % ow, i = (o / (c * ow)) % oh;
        const long long n = o / (c * ow * oh);
        const long long arg = offset_at(argmax, wide, o);
        T sum = T(0);
        for (long long p = 0; p < kh; ++p) {
            for (long long q = 0; q < kw; ++q) {
                sum += x[at(n, i * sh + p, j * sw + q, ch, h, w, c)] * T(arg == p * kw + q);
            }
        }
        y[o] = sum;
    }
}
