// Batch normalisation with statistics per (task t, channel c), for kernels/cuda_batchnorm.py.
//
// Every full-size array is C-contiguous of shape (tasks, outer, channels, inner); the
// wrappers view tinymeta's (T, N, C, S) arrays that way (channels-last data as (T, N * S, C, 1),
// other data as (T, N, C, S)). A "row" is one (t, c), row = t * channels + c, and holds the
// count = outer * inner elements its statistics run over.
//
// Per-row sums take two kernels and no atomics: a *_partial kernel gives each thread one
// (row, chunk) of `chunks` contiguous slices of the row and writes its sums to
// partial[q][row][chunk]; the next kernel gives each thread one row and adds its chunks in
// order. Sums and per-element arithmetic run in double whatever T, rounded to T once at the end.

// The elements of one (row, chunk), visited in order: a chunk may cross from one outer index
// to the next, which moves the offset past the other channels.
struct BnChunk {
    long long row, slot;    // slot = row * chunks + chunk: where its sums go
    long long k, end;       // the row's elements k <= index < end
    long long offset;       // memory offset of element k
    long long inner_index, inner, gap;

    __device__ __forceinline__ bool more() const { return k < end; }

    __device__ __forceinline__ void next() {
        ++k;
        ++offset;
        if (++inner_index == inner) {
            inner_index = 0;
            offset += gap;
        }
    }
};

// Thread i's (row, chunk); the channel is the fastest index, so neighbouring threads read
// neighbouring memory in channels-last data.
__device__ __forceinline__ BnChunk bn_chunk(long long i, long long outer, long long channels,
                                            long long inner, long long chunks) {
    const long long c = i % channels, chunk = (i / channels) % chunks, t = i / (channels * chunks);
    const long long count = outer * inner, length = (count + chunks - 1) / chunks;
    BnChunk ch;
    ch.row = t * channels + c;
    ch.slot = ch.row * chunks + chunk;
    ch.k = chunk * length;
    ch.end = ch.k + length < count ? ch.k + length : count;
    ch.inner = inner;
    ch.inner_index = ch.k % inner;
    ch.offset = ((t * outer + ch.k / inner) * channels + c) * inner + ch.inner_index;
    ch.gap = (channels - 1) * inner;
    return ch;
}

// The row (t * channels + c) of element i of a (tasks, outer, channels, inner) array.
__device__ __forceinline__ long long bn_row(long long i, long long outer, long long channels,
                                            long long inner) {
    return i / (outer * channels * inner) * channels + (i / inner) % channels;
}

// sum over chunks of partial[slot0 + chunk], in chunk order.
__device__ __forceinline__ double bn_add_chunks(const double* partial, long long slot0,
                                                long long chunks) {
    double sum = 0.0;
    for (long long chunk = 0; chunk < chunks; ++chunk) sum += partial[slot0 + chunk];
    return sum;
}

// --- statistics: mean = sum(x) / count, inv_std = 1 / sqrt(sum((x - mean)^2) / count + eps) ---

// partial[row][chunk] = sum of x over the chunk.
template <typename T>
__global__ void bn_sum_partial(const T* x, long long tasks, long long outer, long long channels,
                               long long inner, long long chunks, double* partial) {
    const long long slots = tasks * channels * chunks;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < slots;
         i += (long long)blockDim.x * gridDim.x) {
        BnChunk ch = bn_chunk(i, outer, channels, inner, chunks);
        double sum = 0.0;
        for (; ch.more(); ch.next()) sum += (double)x[ch.offset];
        partial[ch.slot] = sum;
    }
}

// exact[0][row] = mean = sum(x) / count in double, for the next passes; mean[row] in T.
template <typename T>
__global__ void bn_mean_finish(const double* partial, long long rows, long long chunks,
                               long long count, double* exact, T* mean) {
    for (long long row = blockIdx.x * (long long)blockDim.x + threadIdx.x; row < rows;
         row += (long long)blockDim.x * gridDim.x) {
        exact[row] = bn_add_chunks(partial, row * chunks, chunks) / (double)count;
        mean[row] = (T)exact[row];
    }
}

// partial[row][chunk] = sum of (x - mean)^2 over the chunk: the variance around the mean,
// free of the cancellation of E[x^2] - E[x]^2.
template <typename T>
__global__ void bn_centred_square_partial(const T* x, const double* exact, long long tasks,
                                          long long outer, long long channels, long long inner,
                                          long long chunks, double* partial) {
    const long long slots = tasks * channels * chunks;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < slots;
         i += (long long)blockDim.x * gridDim.x) {
        BnChunk ch = bn_chunk(i, outer, channels, inner, chunks);
        const double mean = exact[ch.row];
        double sum = 0.0;
        for (; ch.more(); ch.next()) {
            const double d = (double)x[ch.offset] - mean;
            sum += d * d;
        }
        partial[ch.slot] = sum;
    }
}

// exact[1][row] = inv_std = 1 / sqrt(var + eps) in double, var = sum((x - mean)^2) / count
// (biased); inv_std[row] in T.
template <typename T>
__global__ void bn_inv_std_finish(const double* partial, long long rows, long long chunks,
                                  long long count, double eps, double* exact, T* inv_std) {
    for (long long row = blockIdx.x * (long long)blockDim.x + threadIdx.x; row < rows;
         row += (long long)blockDim.x * gridDim.x) {
        const double var = bn_add_chunks(partial, row * chunks, chunks) / (double)count;
        exact[rows + row] = 1.0 / sqrt(var + eps);
        inv_std[row] = (T)exact[rows + row];
    }
}

// y = (x - mean) * inv_std * weight + bias, from the statistics in double (exact[0], exact[1]).
template <typename T>
__global__ void bn_normalize(const T* x, const double* exact, const T* weight, const T* bias,
                             long long tasks, long long outer, long long channels,
                             long long inner, T* y) {
    const long long rows = tasks * channels, size = rows * outer * inner;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)blockDim.x * gridDim.x) {
        const long long row = bn_row(i, outer, channels, inner);
        const double xhat = ((double)x[i] - exact[row]) * exact[rows + row];
        y[i] = (T)(xhat * (double)weight[row] + (double)bias[row]);
    }
}

// --- backward: gb = sum(gy), gw = sum(gy xhat), gx = w s / n (n gy - gb - xhat gw) ----------

// partial[0][row][chunk] = sum of gy, partial[1][row][chunk] = sum of gy * xhat over the chunk,
// xhat = (x - mean) * inv_std.
template <typename T>
__global__ void bn_backward_partial(const T* gy, const T* x, const T* mean, const T* inv_std,
                                    long long tasks, long long outer, long long channels,
                                    long long inner, long long chunks, double* partial) {
    const long long slots = tasks * channels * chunks;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < slots;
         i += (long long)blockDim.x * gridDim.x) {
        BnChunk ch = bn_chunk(i, outer, channels, inner, chunks);
        const double m = (double)mean[ch.row], s = (double)inv_std[ch.row];
        double sum_gy = 0.0, sum_gy_xhat = 0.0;
        for (; ch.more(); ch.next()) {
            const double g = (double)gy[ch.offset];
            sum_gy += g;
            sum_gy_xhat += g * (((double)x[ch.offset] - m) * s);
        }
        partial[ch.slot] = sum_gy;
        partial[slots + ch.slot] = sum_gy_xhat;
    }
}

// sums[0][row] = gb = sum(gy), sums[1][row] = gw = sum(gy xhat); gb and gw also in T.
template <typename T>
__global__ void bn_backward_finish(const double* partial, long long rows, long long chunks,
                                   double* sums, T* gw, T* gb) {
    for (long long row = blockIdx.x * (long long)blockDim.x + threadIdx.x; row < rows;
         row += (long long)blockDim.x * gridDim.x) {
        sums[row] = bn_add_chunks(partial, row * chunks, chunks);
        sums[rows + row] = bn_add_chunks(partial, (rows + row) * chunks, chunks);
        gb[row] = (T)sums[row];
        gw[row] = (T)sums[rows + row];
    }
}

// gx = w s / n (n gy - gb - xhat gw), s = inv_std, xhat = (x - mean) s, n = count.
template <typename T>
__global__ void bn_backward_input(const T* gy, const T* x, const T* mean, const T* inv_std,
                                  const T* weight, const double* sums, long long tasks,
                                  long long outer, long long channels, long long inner, T* gx) {
    const long long rows = tasks * channels, size = rows * outer * inner;
    const double n = (double)(outer * inner);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)blockDim.x * gridDim.x) {
        const long long row = bn_row(i, outer, channels, inner);
        const double s = (double)inv_std[row];
        const double xhat = ((double)x[i] - (double)mean[row]) * s;
        const double gb = sums[row], gw = sums[rows + row];
        gx[i] = (T)((double)weight[row] * s / n * (n * (double)gy[i] - gb - xhat * gw));
    }
}

// --- double backward: the derivatives of <A, gx> + <ggw, gw> + <ggb, gb>, A = ggx, B = gy ----
//
// With P(v) = v - mean(v) - xhat mean(v xhat), m_A = mean(A xhat), m_B = mean(B xhat) and
// c = mean(A P(B)) = mean(A B) - mean(A) mean(B) - m_A m_B (reference.bn_double_backward):
//   g_gy = w s P(A) + ggw xhat + ggb
//   g_x  = -w s^2 (m_B P(A) + m_A P(B) + c xhat) + s ggw P(B)
//   g_w  = s n c
// A missing ggx (has_ggx == 0) is zero.

// partial[q][row][chunk], q = 0..4: the chunk's sums of A, B, A xhat, B xhat, A B.
template <typename T>
__global__ void bn_double_backward_partial(const T* ggx, long long has_ggx, const T* gy,
                                           const T* x, const T* mean, const T* inv_std,
                                           long long tasks, long long outer, long long channels,
                                           long long inner, long long chunks, double* partial) {
    const long long slots = tasks * channels * chunks;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < slots;
         i += (long long)blockDim.x * gridDim.x) {
        BnChunk ch = bn_chunk(i, outer, channels, inner, chunks);
        const double m = (double)mean[ch.row], s = (double)inv_std[ch.row];
        double sum_a = 0.0, sum_b = 0.0, sum_a_xhat = 0.0, sum_b_xhat = 0.0, sum_ab = 0.0;
        for (; ch.more(); ch.next()) {
            const double a = has_ggx ? (double)ggx[ch.offset] : 0.0;
            const double b = (double)gy[ch.offset];
            const double xhat = ((double)x[ch.offset] - m) * s;
            sum_a += a;
            sum_b += b;
            sum_a_xhat += a * xhat;
            sum_b_xhat += b * xhat;
            sum_ab += a * b;
        }
        partial[ch.slot] = sum_a;
        partial[slots + ch.slot] = sum_b;
        partial[2 * slots + ch.slot] = sum_a_xhat;
        partial[3 * slots + ch.slot] = sum_b_xhat;
        partial[4 * slots + ch.slot] = sum_ab;
    }
}

// means[q][row] = mean(A), mean(B), m_A, m_B, c; g_w = s n c.
template <typename T>
__global__ void bn_double_backward_finish(const double* partial, long long rows, long long chunks,
                                          long long count, const T* inv_std, double* means,
                                          T* g_w) {
    for (long long row = blockIdx.x * (long long)blockDim.x + threadIdx.x; row < rows;
         row += (long long)blockDim.x * gridDim.x) {
        const double n = (double)count;
        const double mean_a = bn_add_chunks(partial, row * chunks, chunks) / n;
        const double mean_b = bn_add_chunks(partial, (rows + row) * chunks, chunks) / n;
        const double m_a = bn_add_chunks(partial, (2 * rows + row) * chunks, chunks) / n;
        const double m_b = bn_add_chunks(partial, (3 * rows + row) * chunks, chunks) / n;
        const double mean_ab = bn_add_chunks(partial, (4 * rows + row) * chunks, chunks) / n;
        const double c = mean_ab - mean_a * mean_b - m_a * m_b;
        means[row] = mean_a;
        means[rows + row] = mean_b;
        means[2 * rows + row] = m_a;
        means[3 * rows + row] = m_b;
        means[4 * rows + row] = c;
        g_w[row] = (T)((double)inv_std[row] * n * c);
    }
}

// g_gy and g_x (each written only where need_gy / need_x is nonzero) from the means above.
template <typename T>
__global__ void bn_double_backward_inputs(const T* ggx, long long has_ggx, const T* gy,
                                          const T* x, const T* mean, const T* inv_std,
                                          const T* weight, const T* ggw, const T* ggb,
                                          const double* means, long long tasks, long long outer,
                                          long long channels, long long inner, long long need_gy,
                                          long long need_x, T* g_gy, T* g_x) {
    const long long rows = tasks * channels, size = rows * outer * inner;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < size;
         i += (long long)blockDim.x * gridDim.x) {
        const long long row = bn_row(i, outer, channels, inner);
        const double mean_a = means[row], mean_b = means[rows + row];
        const double m_a = means[2 * rows + row], m_b = means[3 * rows + row];
        const double c = means[4 * rows + row];
        const double s = (double)inv_std[row], w = (double)weight[row], gw = (double)ggw[row];
        const double xhat = ((double)x[i] - (double)mean[row]) * s;
        const double a = has_ggx ? (double)ggx[i] : 0.0;
        const double p_a = a - mean_a - xhat * m_a;
        const double p_b = (double)gy[i] - mean_b - xhat * m_b;
        if (need_gy) g_gy[i] = (T)(w * s * p_a + gw * xhat + (double)ggb[row]);
        if (need_x) g_x[i] = (T)(-w * s * s * (m_b * p_a + m_a * p_b + c * xhat) + s * gw * p_b);
    }
}
