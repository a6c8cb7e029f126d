//! Continue a prompt with a model trained by `peer train` (or the training examples).
//!
//! ```text
//! cargo run --release --example generate -- runs/peer/model "And God said"
//! ```

use std::path::PathBuf;

use burn::tensor::Device;
use peer::model::SamplingConfig;
use peer::model::checkpoint::{load_meta, load_model};
use peer::train::tokenizer::TextTokenizer;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "runs/peer/model".into()));
    let prompt = args.next().unwrap_or_else(|| "In the beginning".into());
    let run = || -> Result<String, peer::train::TrainError> {
        let device = Device::flex();
        let meta = load_meta(&dir)?;
        let tokenizer_path = meta.tokenizer.as_ref().and_then(|t| t.path.clone()).ok_or_else(|| {
            peer::train::TrainError::Tokenizer { path: dir.clone(), reason: "the checkpoint names no tokenizer".into() }
        })?;
        let tokenizer = TextTokenizer::from_file(&tokenizer_path)?;
        tokenizer.check_matches(&meta, &dir)?;
        let (_, model, _) = load_model(&dir, &device)?;
        let ids = tokenizer.encode(&prompt)?;
        let room = model.max_seq_len().saturating_sub(ids.len()).min(80);
        let sampling = SamplingConfig::new().with_temperature(0.8).with_top_p(Some(0.95));
        tokenizer.decode(&model.generate(&ids, room, &sampling)?)
    };
    match run() {
        Ok(text) => println!("{prompt}{text}"),
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(1);
        }
    }
}
