"""Super-resolution: degradations (``degrade``), the network (``net``), ZSSR (``zssr``), MZSR (``mzsr``), the
methods by name (``methods``) and the ``upcli sr`` job (``job``)."""
