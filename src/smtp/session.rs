//! One client session: the SMTP state machine (SPEC §5).
