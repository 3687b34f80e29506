"""Images in requests: what crosses from the router to the engine (`inputs`), and their embeddings (`encoder`).

The router expands each image into the model's image tokens with the model's own processor and sends the
image as its encoded file, with the number of tokens it took. The engine encodes an image when a step
first feeds one of its tokens and hands each step the embedding rows of the image tokens it feeds, so a
prefill chunk may cover part of an image. An image's content hash joins the prefix hash of the KV block
holding its first token: the placeholder token ids are the same for every image.
"""

from tokenmill.multimodal.inputs import ImageInput, ImageSpan, decode_image, image_block_keys, place_images

__all__ = ["ImageInput", "ImageSpan", "decode_image", "image_block_keys", "place_images"]
