"""Fused ops for upcli, imported as ``upcli.kernels``.

- ``adaptive_conv(x, weights, padding)``: each pixel's k x k neighbourhood times that pixel's own weights.
- ``adaptive_conv_bicubic(x, weights, padding)``: the same on ``x`` resized (bicubic) to the weights' size (a JBU
  stage), without storing the resized ``x`` on CPU.
- ``neighbour_logits(keys, k)``: each pixel's key dotted with its k x k neighbours' keys (JBU's range kernel).
- ``pac_conv(x, kernel, weight, ...)``: the PAC form, with stride, dilation and the transposed variant.
- ``pac_pool(x, kernel, ...)``: PAC's pooling form (every channel alike; also shared-filter PAC layers).
- ``pac_squared_distance(guidance, kernel_size, ...)``: the squared guidance distances PAC's kernels are made of.
- ``pac_tap_mask(input_size, kernel_size, ...)``: which taps land on real input (PAC's normalisation mask).
- ``neighbourhood_attention(query, key, value, k)``: each output pixel's softmax attention over the k x k feature
  cells around it (cross-scale: query at the output resolution, key and value on the feature grid).

Backends (Triton on CUDA, C++ on CPU compiled at first use, plain PyTorch) are chosen at run time;
nothing is compiled at install and nothing touches the GPU at import.
"""

from .adaptive_conv import adaptive_conv, adaptive_conv_bicubic, neighbour_logits
from .neighbourhood_attention import neighbourhood_attention
from .pac import pac_conv, pac_pool, pac_squared_distance, pac_tap_mask

__all__ = ["adaptive_conv", "adaptive_conv_bicubic", "neighbour_logits", "neighbourhood_attention", "pac_conv",
           "pac_pool", "pac_squared_distance", "pac_tap_mask"]
