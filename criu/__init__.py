"""CRIU for Kybernate: finding and checking CRIU, the config file runc hands it, its logs, images.

Standard library only, so the shim's hot paths and tools can import it cheaply.
"""
from .binary import criu_check, criu_version, find_criu, parse_version, require_criu4
from .config import (CRIU_CONFIG_ANNOTATION, RUNC_DEFAULT_CONFIG, annotate_bundle, criu_config_of,
                     render_criu_config, set_criu_config_annotation, write_runc_criu_config)
from .errors import CriuError, CriuImageError
from .images import (COMPLETE_MARKER, ImageStats, clear_complete, image_stats, is_complete,
                     mark_complete, read_completion, remove_incomplete, validate_image_dir)
from .logs import describe_failure, first_error, locate_log
from .plans import CheckpointPlan, RestorePlan

__all__ = [
    "CRIU_CONFIG_ANNOTATION", "RUNC_DEFAULT_CONFIG", "COMPLETE_MARKER",
    "CheckpointPlan", "RestorePlan", "CriuError", "CriuImageError", "ImageStats",
    "annotate_bundle", "clear_complete", "criu_check", "criu_config_of", "criu_version",
    "describe_failure", "find_criu", "first_error", "image_stats", "is_complete", "locate_log",
    "mark_complete", "parse_version", "read_completion", "remove_incomplete", "render_criu_config",
    "require_criu4", "set_criu_config_annotation", "validate_image_dir", "write_runc_criu_config",
]
