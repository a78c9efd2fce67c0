"""charrnn export: a trained run → validated single-step SavedModel/ONNX bundle (charrnn-export)."""
