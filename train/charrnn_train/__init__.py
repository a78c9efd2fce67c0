"""charrnn training: the report's Keras GRU on any UTF-8 text (charrnn-train)."""
