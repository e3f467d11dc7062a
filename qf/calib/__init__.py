"""Streaming calibration for quantization methods (GPTQ, AWQ, ...): calibration text -> token windows, the
model's decoder blocks run one at a time in f32 (the runtime's own block code, qf.runtime.arch), each
quantized by a method of qf.quant.methods and its quantized output fed to the next block; the file is written
as the layers finish. Sits above qf.convert and qf.runtime (it needs both). See docs/calibration.md."""
