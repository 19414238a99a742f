"""Export to deployment engines. ONNX: `leanlm.export.onnx.export_onnx`, `leanlm.export.onnx_in.quantize_onnx`."""
