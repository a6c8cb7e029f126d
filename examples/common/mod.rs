//! What the training examples share: only the device differs between them.

use std::path::PathBuf;

use burn::tensor::Device;
use peer::model::SamplingConfig;
use peer::train::corpus::{Corpus, bundled_corpus};
use peer::train::tokenizer::TextTokenizer;
use peer::train::training::{TrainOptions, TrainingConfig, train};

/// Trains the small PEER LM on `device` (epochs and steps per epoch from the command line,
/// default 2 × 20), prints the evaluation and a sample.
pub fn train_and_sample(device: Device, out: &str) {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let mut config = TrainingConfig::small_peer();
    config.epochs = args.next().and_then(Result::ok).unwrap_or(2);
    config.steps_per_epoch = args.next().and_then(Result::ok).unwrap_or(20);

    let run = || -> Result<(), peer::train::TrainError> {
        let corpus = Corpus::load(&bundled_corpus())?;
        let tokenizer = TextTokenizer::for_corpus(&corpus, config.vocab_size)?;
        let summary = train(TrainOptions {
            config: config.clone(),
            corpus: &corpus,
            tokenizer: &tokenizer,
            device: device.clone(),
            artifact_dir: PathBuf::from(out),
            resume: false,
            checkpoints: true,
        })?;
        let e = &summary.evaluation;
        println!("validation perplexity {:.2} (unigram {:.2})", e.perplexity, e.unigram_perplexity);
        for block in &e.routing {
            println!("block {}: {}", block.block, block.report);
        }
        let (_, model, _) = peer::model::checkpoint::load_model(&summary.model_dir, &device)?;
        let prompt = tokenizer.encode("In the beginning")?;
        let new = model.generate(&prompt, 40, &SamplingConfig::new().with_temperature(0.8))?;
        println!("sample: In the beginning{}", tokenizer.decode(&new)?);
        Ok(())
    };
    if let Err(err) = run() {
        eprintln!("error: {err}");
        std::process::exit(1);
    }
}
