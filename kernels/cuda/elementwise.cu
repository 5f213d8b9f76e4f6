// Elementwise steps of a training loop: one thread per element of flat arrays (the arrays'
// memory order), each element read and written once. Sizes and indices are long long.

// y = max(x, 0) as NumPy's maximum gives it: NaN stays NaN, -0.0 becomes +0.0.
template <typename T>
__global__ void relu_forward(const T* __restrict__ x, T* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        const T v = x[i];
        y[i] = (v > T(0) || v != v) ? v : T(0);
    }
}

// gx = gy * [x > 0]: the ReLU's derivative (0 at x <= 0), as a product, so NaN in gy stays.
template <typename T>
__global__ void relu_backward(const T* __restrict__ gy, const T* __restrict__ x,
                              T* __restrict__ gx, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        gx[i] = gy[i] * T(x[i] > T(0));
    }
}

// param = param - lr * grad, in place.
template <typename T>
__global__ void sgd_update(T* __restrict__ param, const T* __restrict__ grad, T lr, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        param[i] = param[i] - lr * grad[i];
    }
}

// One Adam step, in place, with reference.adam_update_'s operations in its order:
//   p = p * param_decay (if decoupled);  g = grad + weight_decay * p (if coupled)
//   m = m * beta1 + keep1 * g;  v = v * beta2 + (keep2 * g) * g  (keep = 1 - beta, rounded)
//   v_max = max(v_max, v) with NaN winning (if amsgrad; then v = v_max)
//   p = p + step_size * (m / (sqrt(v) / bias_correction2_sqrt + eps))
// Without amsgrad, max_exp_avg_sq may be any array (exp_avg_sq): it is not read.
template <typename T>
__global__ void adam_update(T* param, const T* grad, T* exp_avg, T* exp_avg_sq,
                            T* max_exp_avg_sq, T beta1, T keep1, T beta2, T keep2, T eps,
                            T step_size, T bias_correction2_sqrt, T weight_decay,
                            T param_decay, long long decoupled, long long coupled,
                            long long amsgrad, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)blockDim.x * gridDim.x) {
        T p = param[i];
        if (decoupled) p = p * param_decay;
        T g = grad[i];
        if (coupled) g = g + weight_decay * p;
        const T m = exp_avg[i] * beta1 + keep1 * g;
        T v = exp_avg_sq[i] * beta2 + (keep2 * g) * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        if (amsgrad) {
            const T v_max = max_exp_avg_sq[i];
            if (v_max >= v || v_max != v_max) v = v_max;  // else v is larger, or NaN
            max_exp_avg_sq[i] = v;
        }
        param[i] = p + step_size * (m / (sqrt(v) / bias_correction2_sqrt + eps));
    }
}
