// Batched matrix product C[p, q] = A[p, q] @ B[p, q] for small products, for
// kernels/cuda_matmul.py: one launch that, unlike a cuBLAS call, CuPy lets a CUDA graph capture.
//
// A is read through element strides (two batch axes p, q, then row, column), B likewise, so a
// transposed operand (a swapaxes view) or a broadcast batch axis (stride 0) needs no copy.
// C is C-contiguous (batch0, batch1, m, n). One thread per element of C.
//
// Each element is a sum over k in increasing order, in T (float sums in float), with every
// product rounded before it is added: the result of a naive loop, bit for bit. The product is
// written with __fmul_rn / __dmul_rn on the GPU because NVCC and NVRTC fuse `s + x * y` into a
// multiply-add by default, which rounds once instead of twice.

#ifdef __CUDACC__
__device__ __forceinline__ float rounded_product(float x, float y) { return __fmul_rn(x, y); }
__device__ __forceinline__ double rounded_product(double x, double y) { return __dmul_rn(x, y); }
#else  // the CPU emulator (g++ with -ffp-contract=off): a product is rounded on its own
__device__ __forceinline__ float rounded_product(float x, float y) { return x * y; }
__device__ __forceinline__ double rounded_product(double x, double y) { return x * y; }
#endif

template <typename T>
__global__ void matmul(const T* a, const T* b, T* __restrict__ c, long long batch0,
                       long long batch1, long long m, long long n, long long k,
                       long long a_batch0, long long a_batch1, long long a_row, long long a_col,
                       long long b_batch0, long long b_batch1, long long b_row, long long b_col) {
    const long long total = batch0 * batch1 * m * n;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < total;
         e += (long long)blockDim.x * gridDim.x) {
        // e = ((p * batch1 + q) * m + i) * n + j: neighbouring threads take neighbouring
        // columns j, so reads of a C-contiguous B are coalesced and A's row is shared.
        const long long j = e % n, i = (e / n) % m, pq = e / (n * m);
        const long long p = pq / batch1, q = pq % batch1;
        const T* a_i = a + p * a_batch0 + q * a_batch1 + i * a_row;  // row i of A[p, q]
        const T* b_j = b + p * b_batch0 + q * b_batch1 + j * b_col;  // column j of B[p, q]
        T sum = T(0);
        for (long long t = 0; t < k; ++t) {
            sum = sum + rounded_product(a_i[t * a_col], b_j[t * b_row]);
        }
        c[e] = sum;
    }
}
