"""charrnn runtime"""
