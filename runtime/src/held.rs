//! [`Held`]: how a session or a trainer holds the model and the device it runs on.

use std::ops::Deref;
use std::sync::Arc;

/// A model or device a session or trainer uses: borrowed from a caller that outlives it (the
/// CLI's `Session::new(&model, &gpu, ..)`), or shared, so that the holder can be kept beside
/// what it uses with no borrow (the browser engine keeps its model and sessions in one struct).
#[derive(Debug)]
pub enum Held<'a, T> {
    /// Borrowed for the holder's lifetime.
    Borrowed(&'a T),
    /// Shared ownership: the holder keeps it alive.
    Shared(Arc<T>),
}

impl<T> Deref for Held<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Held::Borrowed(t) => t,
            Held::Shared(t) => t,
        }
    }
}

impl<T> Clone for Held<'_, T> {
    fn clone(&self) -> Self {
        match self {
            Held::Borrowed(t) => Held::Borrowed(t),
            Held::Shared(t) => Held::Shared(t.clone()),
        }
    }
}

impl<'a, T> From<&'a T> for Held<'a, T> {
    fn from(t: &'a T) -> Self {
        Held::Borrowed(t)
    }
}

impl<T> From<Arc<T>> for Held<'static, T> {
    fn from(t: Arc<T>) -> Self {
        Held::Shared(t)
    }
}
