"""Post-training quantization of MiniLM models: 8- and 4-bit weights, int8 activations, RTN and GPTQ (chapter 5).

    from minimoe.quant import quantize, Quantizer, moe_policy, save_quantized, load_quantized
    q = quantize(model, bits=4, group_size=128)                      # a quantized copy; model is untouched
    q = Quantizer(bits=4, group_size=128, activation_quant=True).quantize(model)   # the article's listing
    q = quantize(model, 4, method="gptq")                            # error-compensating (Frantar et al. 2022)
    q = quantize(moe_model, 4, policy=moe_policy())                  # experts 4-bit, attention 8-bit
    save_quantized(q, "runs/q4"); q = load_quantized("runs/q4")      # packed bytes in safetensors

One file per concept:
    formats.py     Scheme, round-to-nearest, the stored format (packed int4, fp16 scales, int8 zero points)
    gptq.py        GPTQ
    layers.py      QuantLinear / QuantExperts: the reference dequantize-then-matmul and torch's packed kernels
    policy.py      which layers get which scheme; quantize(), Quantizer
    checkpoint.py  save_quantized / load_quantized / stored_bytes
    bench.py       decode speed, bits per byte and compression of each scheme, with the issue's goals
"""
from .checkpoint import load_quantized, save_quantized, stored_bytes
from .formats import QuantizedWeight, Scheme, pack_int4, quantize_rtn, unpack_int4
from .gptq import Hessian, gptq_quantize, layer_error
from .layers import QuantExperts, QuantLinear, quantize_activations
from .policy import (KINDS, Quantizer, calibration_data, is_quantized, layer_kind, make_policy, moe_policy,
                     quantize, set_kernel)

__all__ = ["quantize", "Quantizer", "Scheme", "moe_policy", "make_policy", "KINDS", "layer_kind", "is_quantized",
           "set_kernel", "calibration_data", "QuantLinear", "QuantExperts", "QuantizedWeight", "quantize_rtn",
           "pack_int4", "unpack_int4", "quantize_activations", "gptq_quantize", "Hessian", "layer_error",
           "save_quantized", "load_quantized", "stored_bytes"]
