"""Vision-language models: image processors (NumPy + Pillow, equal to transformers'), vision towers and
projectors as `flax.nnx` modules, and the glue that puts image features into a text model's prompt.

`registry.py` maps a config.json `model_type` to its family module (`llava.py`, `llava_next.py`, ...);
`image_input.ImageInput` is what a processor makes of one image; `encoder.VisionModel` runs the tower;
`prompt.py` places images in a prompt and hands the engine their feature rows; `media.py` turns request
content (data/http/file URLs, PIL images) into images under the configured limits."""

from jaxrs.vision.image_input import ImageInput

__all__ = ["ImageInput"]
