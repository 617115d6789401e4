"""Export: merge an adapter into its base (or take a full/freeze run) and write a verified Hugging Face folder."""

from tunelab.export.chat_template import check_chat_template, install_chat_template, jinja_chat_template
from tunelab.export.merge import EXPORT_DTYPES, MERGE_RTOL, Check, ExportReport, export_model

__all__ = [
    "Check",
    "EXPORT_DTYPES",
    "ExportReport",
    "MERGE_RTOL",
    "check_chat_template",
    "export_model",
    "install_chat_template",
    "jinja_chat_template",
]
