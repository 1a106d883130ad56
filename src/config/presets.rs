//! Provider presets (SPEC §3 table): defaults that a channel's explicit keys override.
