// Softmax cross-entropy from logits (N, C) and integer labels (N,) (int64, in [0, C)).

// loss_n = log(sum_c exp(x_nc - m_n)) - (x_n,label - m_n) with m_n = max_c x_nc, and
// probs_nc = exp(x_nc - m_n) / sum_c exp(x_nc - m_n): one thread per row (the row's sum in a
// fixed order). A NaN or inf logit makes the row's results NaN, as in the reference.
template <typename T>
__global__ void softmax_xent_forward(const T* __restrict__ logits,
                                     const long long* __restrict__ labels, T* __restrict__ loss,
                                     T* __restrict__ probs, long long n, long long c) {
    for (long long row = blockIdx.x * (long long)blockDim.x + threadIdx.x; row < n;
         row += (long long)blockDim.x * gridDim.x) {
        const T* x = logits + row * c;
        T* e = probs + row * c;
        T top = x[0];
        for (long long k = 1; k < c; ++k) {
            if (x[k] > top) top = x[k];
        }
        T total = T(0);
        for (long long k = 0; k < c; ++k) {
            e[k] = exp(x[k] - top);
            total += e[k];
        }
        for (long long k = 0; k < c; ++k) e[k] = e[k] / total;
        loss[row] = log(total) - (x[labels[row]] - top);
    }
}

// glogits_nc = gloss_n * probs_nc - gloss_n [c == label_n]: one thread per element.
template <typename T>
__global__ void softmax_xent_backward(const T* __restrict__ probs,
                                      const long long* __restrict__ labels,
                                      const T* __restrict__ gloss, T* __restrict__ glogits,
                                      long long n, long long c) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n * c;
         i += (long long)blockDim.x * gridDim.x) {
        const long long row = i / c;
        const T g = probs[i] * gloss[row];
        glogits[i] = i - row * c == labels[row] ? g - gloss[row] : g;
    }
}
