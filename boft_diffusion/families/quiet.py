"""Library messages that are not ours and that a user cannot act on, dropped where we import the
libraries (``families/`` loads diffusers pipelines; importing it installs the filters)."""

from __future__ import annotations

import logging

#: (logger, text of the message). transformers 5 warns, once per class, that its image processors
#: fall back to Pillow without torchvision; diffusers' pipelines import them (the safety checker's
#: feature extractor) and we never use them, so there is nothing to install or fix.
UNACTIONABLE = (("transformers.utils.import_utils", "requires torchvision (not installed)"),)


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message contains ``text``."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_library_messages() -> None:
    """Install the filters of ``UNACTIONABLE``, once however often it is called."""
    for name, text in UNACTIONABLE:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.text == text for f in logger.filters):
            logger.addFilter(DropMessages(text))
