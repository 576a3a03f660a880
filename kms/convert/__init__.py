"""Conversions applied to messages at delivery: TNEF and uuencode to MIME (SPEC §9)."""

from kms.convert.message import ConversionReport, convert_message

__all__ = ["ConversionReport", "convert_message"]
