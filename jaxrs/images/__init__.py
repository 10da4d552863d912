"""Text-to-image with FLUX (schnell and dev) in JAX: the components (`clip_text`, `t5_encoder`,
`flux_transformer`, `vae_decoder`), the sampler (`flow_match`), the pipeline, its loading, and the
`ImageModel` API."""

from jaxrs.images.image_model import ImageLimits, ImageModel, ImageRequestError

__all__ = ["ImageLimits", "ImageModel", "ImageRequestError"]
