//! Client AUTH PLAIN / LOGIN against `[[users]]` (argon2 hashes).

// TEMPORARY (lead): replaced by the session helper's implementation.
/// argon2id hash of a password.
pub fn hash_password(_pw: &str) -> String {
    todo!()
}
