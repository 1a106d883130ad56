//! Client AUTH PLAIN / LOGIN against `[[users]]` (argon2 hashes).
