"""Stage — nuclei: HoVer-Net-style instance segmentation on the project's backbones, from training to whole slides.

``data`` / ``annotations`` read images and their nuclei (Aperio XML, QuPath GeoJSON, label images, .npy,
.mat); ``model`` / ``losses`` / ``train`` train the network on :mod:`gigaslide.runs`; ``postprocess``
turns its maps into instances; ``metrics`` / ``evaluate`` score them; ``slide`` / ``export`` run it on
whole slides and write QuPath GeoJSON, a table and per-tile counts.
"""
