//! The text to train on: the bundled World English Bible, or any file or folder of `.txt`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{TrainError, io};

/// The bundled corpus (see `data/README.md` for provenance and the split).
pub fn bundled_corpus() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/web"))
}

/// Books of the bundled corpus held out for validation: one per part of the collection.
pub const VALIDATION_BOOKS: [&str; 6] =
    ["08-ruth.txt", "21-ecclesiastes.txt", "29-joel.txt", "40-tobit.txt", "55-mark.txt", "62-galatians.txt"];

/// A corpus split into training and validation text.
#[derive(Debug, Clone)]
pub struct Corpus {
    /// Where it came from.
    pub path: PathBuf,
    /// Training documents.
    pub train: Vec<String>,
    /// Validation documents.
    pub validation: Vec<String>,
}

impl Corpus {
    /// Loads and splits a corpus.
    ///
    /// - A folder: every `.txt` file (sorted by name) is a document. Files named in
    ///   [`VALIDATION_BOOKS`] are validation; if none of them is present, every tenth file
    ///   (the 10th, 20th, …) is; a folder with a single file is split like a file.
    /// - A file: the last 10% of its lines are validation.
    pub fn load(path: &Path) -> Result<Self, TrainError> {
        if !path.exists() {
            return Err(TrainError::MissingCorpus(path.to_path_buf()));
        }
        let mut documents: Vec<(String, String)> = if path.is_dir() {
            let mut files: Vec<PathBuf> = fs::read_dir(path)
                .map_err(io("read", path))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "txt") && p.is_file())
                .collect();
            files.sort();
            files
                .into_iter()
                .map(|file| {
                    let name = file.file_name().unwrap_or_default().to_string_lossy().into_owned();
                    fs::read_to_string(&file).map(|text| (name, text)).map_err(io("read", &file))
                })
                .collect::<Result<_, _>>()?
        } else {
            vec![(String::new(), fs::read_to_string(path).map_err(io("read", path))?)]
        };
        documents.retain(|(_, text)| !text.trim().is_empty());
        if documents.is_empty() {
            return Err(TrainError::EmptyCorpus(path.to_path_buf()));
        }

        let (train, validation) = if documents.len() == 1 {
            let text = documents.pop().unwrap().1;
            let lines: Vec<&str> = text.lines().collect();
            let cut = lines.len() - (lines.len() / 10).max(1).min(lines.len().saturating_sub(1));
            (vec![lines[..cut].join("\n")], vec![lines[cut..].join("\n")])
        } else {
            let named = documents.iter().any(|(name, _)| VALIDATION_BOOKS.contains(&name.as_str()));
            let mut train = Vec::new();
            let mut validation = Vec::new();
            for (index, (name, text)) in documents.into_iter().enumerate() {
                let held_out = if named { VALIDATION_BOOKS.contains(&name.as_str()) } else { (index + 1) % 10 == 0 };
                if held_out { validation.push(text) } else { train.push(text) }
            }
            if validation.is_empty() {
                // Fewer than ten files and none named: hold out the last one.
                validation.push(train.pop().expect("at least two documents"));
            }
            (train, validation)
        };
        Ok(Self { path: path.to_path_buf(), train, validation })
    }
}
