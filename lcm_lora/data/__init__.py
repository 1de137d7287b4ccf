"""Training data: sources -> safely decoded, preprocessed batches, or cached encodings."""

from .images import BadSample, open_image, preprocess_image
from .loader import BadSampleLog, Collate, make_dataloader, pick_caption
from .sources import DataError, load_source

__all__ = ["BadSample", "BadSampleLog", "Collate", "DataError", "load_source", "make_dataloader", "open_image",
           "pick_caption", "preprocess_image"]
