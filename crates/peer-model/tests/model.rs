//! peer-model's tests, in one binary so Burn is linked once.

mod model {
    pub mod checkpoint;
    pub mod cost;
    pub mod generation;
    pub mod helpers;
    pub mod row_sparse;
    pub mod training;
}
