//! Errors reported by this crate.

use std::borrow::Cow;

/// An invalid configuration: which field, and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: `{field}` {rule}")]
pub struct ConfigError {
    /// The name of the offending field, as spelled in the config struct.
    pub field: &'static str,
    /// The rule that was broken, with the offending value.
    pub rule: Cow<'static, str>,
}

impl ConfigError {
    /// An error for `field` breaking `rule`.
    pub fn new(field: &'static str, rule: impl Into<Cow<'static, str>>) -> Self {
        Self { field, rule: rule.into() }
    }
}
