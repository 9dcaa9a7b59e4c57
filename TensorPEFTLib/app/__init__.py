"""The browser app (``tensorpeft app``): the workflow of the Slicer module in a web page, on Kitware's trame-slicer.

- :mod:`.data_root` — the one folder the page may touch; folders of scans paired with their labels.
- :mod:`.access` — loopback by default; a token on any other address.
- :mod:`.session` — what each button does, through the front-end layer's requests and worker jobs.
- :mod:`.viewer` — the Slicer-core scene and views (volumes, segmentation overlays, 3D surfaces).
- :mod:`.page` — the page layout; :mod:`.curve` — the live training curve; :mod:`.server` — wiring and serving.

Only :mod:`.data_root`, :mod:`.access`, :mod:`.curve` and :mod:`.session` import without the ``app`` extra.
"""
