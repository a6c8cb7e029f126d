//! peer-train
