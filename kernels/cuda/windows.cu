// Convolution windows: im2col and its adjoint col2im. Images are (N, H, W, C) (channels-last
// memory), zero-padded by (ph, pw) on each side; the windows are kh x kw with stride (sh, sw),
// (OH, OW) of them; cols is (N, OH, OW, kh, kw, C). One thread per output element.

// cols[n, i, j, p, q, ch] = x_pad[n, i*sh + p, j*sw + q, ch] (zero in the padding).
template <typename T>
__global__ void im2col(const T* __restrict__ x, T* __restrict__ cols, long long n_, long long c,
                       long long h, long long w, long long oh, long long ow, long long kh,
                       long long kw, long long sh, long long sw, long long ph, long long pw) {
    const long long total = n_ * oh * ow * kh * kw * c;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)blockDim.x * gridDim.x) {
        const long long ch = o % c, q = (o / c) % kw, p = (o / (c * kw)) % kh;
        const long long window = o / (c * kw * kh);  // (n, i, j)
        const long long j = window % ow, i = (window / ow) % oh, n = window / (ow * oh);
        const long long r = i * sh + p - ph, s = j * sw + q - pw;
        const bool inside = r >= 0 && r < h && s >= 0 && s < w;
        cols[o] = inside ? x[((n * h + r) * w + s) * c + ch] : T(0);
    }
}

// gx[n, r, s, ch] = sum of cols[n, i, j, p, q, ch] over the windows (i, j) and offsets (p, q)
// with i*sh + p = r + ph and j*sw + q = s + pw: each pixel gathers its window elements (no
// atomics), added as the reference adds them: offsets in increasing order (i, j decreasing).
template <typename T>
__global__ void col2im(const T* __restrict__ cols, T* __restrict__ gx, long long n_, long long c,
                       long long h, long long w, long long oh, long long ow, long long kh,
                       long long kw, long long sh, long long sw, long long ph, long long pw) {
    const long long total = n_ * h * w * c;
    for (long long o = blockIdx.x * (long long)blockDim.x + threadIdx.x; o < total;
         o += (long long)blockDim.x * gridDim.x) {
        const long long ch = o % c, s = (o / c) % w, r = (o / (c * w)) % h;
        const long long n = o / (c * w * h);
        const long long rp = r + ph, sp = s + pw;  // in the padded image
        // Windows i with i*sh <= rp < i*sh + kh, among 0 .. oh-1 (likewise j).
        const long long i_first = rp >= kh ? (rp - kh) / sh + 1 : 0;
        const long long j_first = sp >= kw ? (sp - kw) / sw + 1 : 0;
        const long long i_last = rp / sh < oh - 1 ? rp / sh : oh - 1;
        const long long j_last = sp / sw < ow - 1 ? sp / sw : ow - 1;
        T sum = T(0);
        for (long long i = i_last; i >= i_first; --i) {
            for (long long j = j_last; j >= j_first; --j) {
                const long long p = rp - i * sh, q = sp - j * sw;
                sum += cols[((((n * oh + i) * ow + j) * kh + p) * kw + q) * c + ch];
            }
        }
        gx[o] = sum;
    }
}
