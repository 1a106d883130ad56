//! Below the flow: a panic while one message is delivered must cost that delivery, not
//! the process, the channel's worker or a connection slot (SPEC §7: "A delivery that
//! fails for any internal reason frees its connection slot and is retried like a 4xx").
//!
//! [`catch_unwind`] wraps a future: a panic in one of its polls ends it with the panic's
//! text instead of unwinding through the caller. The future is dropped at once, so what
//! it held (a semaphore permit, a pooled connection, a message's lock) is given back.
//! The process's panic hook has already printed the panic and where it happened.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

/// `future`, with a panic in it turned into `Err(text of the panic)`.
pub fn catch_unwind<F: Future>(future: F) -> CatchUnwind<F> {
    CatchUnwind {
        inner: Some(Box::pin(future)),
    }
}

/// The future of [`catch_unwind`].
pub struct CatchUnwind<F> {
    /// `None` once it has ended (answered or panicked).
    inner: Option<Pin<Box<F>>>,
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Pending;
        };
        // Unwind-safe enough: after a panic the future is never polled again, only dropped.
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => {
                this.inner = None;
                Poll::Ready(Ok(output))
            }
            Err(payload) => {
                this.inner = None;
                Poll::Ready(Err(panic_text(payload.as_ref())))
            }
        }
    }
}

/// The text a panic was raised with (`panic!("…")`, an overflow, an `unwrap`).
pub fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic without a message".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_panic_becomes_an_error_and_frees_what_the_future_held() {
        let permits = Arc::new(tokio::sync::Semaphore::new(1));
        let held = permits.clone();
        let got = catch_unwind(async move {
            let _permit = held.acquire_owned().await.unwrap();
            tokio::task::yield_now().await;
            let huge: Option<u64> = Some(u64::MAX);
            if huge.is_some() {
                panic!("boom {}", 7);
            }
            1
        })
        .await;
        assert_eq!(got, Err("boom 7".to_string()));
        assert_eq!(permits.available_permits(), 1, "the permit was given back");
        assert_eq!(catch_unwind(async { 5 }).await, Ok(5));
    }
}
