"""Prometheus metrics of what uoomd sees and does (issue 17).

``registry`` keeps the values, ``exposition`` renders them in the text format, ``collector``
folds the daemon's log events and per-tick readings into them (all three pure); ``textfile``
writes the node_exporter textfile and ``listener`` serves ``GET /metrics`` without blocking
the loop (the two with I/O).
"""
