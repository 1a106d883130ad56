//! Streaming DATA / BDAT decoder: finds the end of data (`<CRLF>.<CRLF>` only),
//! removes dot-stuffing and handles bare CR / LF, whatever the chunk boundaries.
