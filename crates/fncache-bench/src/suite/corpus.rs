//! What a corpus directory (scripts/fetch-corpus) holds: the newest release of each package,
//! its previous release, and the families.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::*;

/// The modules `fncache-bench CORPUS` measures: the newest release of each package, with the
/// newest older release whose module differs as its previous release; and each package of many
/// modules as a family (the shared-library scenario).
pub fn discover(corpus: &Path) -> Result<(Vec<Subject>, Vec<Family>)> {
    let mut families = Vec::new();
    let mut subjects_with_edits = Vec::new();
    let mut packages: BTreeMap<String, Vec<(Vec<u64>, PathBuf)>> = BTreeMap::new();
    for entry in
        fs::read_dir(corpus).with_context(|| format!("cannot read {}", corpus.display()))?
    {
        let dir = entry?.path();
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        if let Some(program) = name.strip_suffix("-source-edits") {
            subjects_with_edits.push(source_edits(program, &dir)?);
            continue;
        }
        let Some((package, version)) = name.rsplit_once('-') else {
            continue;
        };
        let modules: Vec<PathBuf> = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
            .collect();
        match modules.as_slice() {
            [] => {}
            [module] => {
                let version = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
                packages
                    .entry(package.to_string())
                    .or_default()
                    .push((version, module.clone()));
            }
            _ => {
                let mut modules = modules;
                modules.sort();
                families.push(Family {
                    name: format!("{package}@{version}"),
                    modules,
                });
            }
        }
    }
    let mut subjects = Vec::new();
    for (package, mut releases) in packages {
        releases.sort();
        let (version, newest) = releases.pop().expect("at least one release");
        let bytes = fs::read(&newest)?;
        let mut previous = None;
        while let Some((_, older)) = releases.pop() {
            if fs::read(&older)? != bytes {
                previous = Some(older);
                break;
            }
        }
        let version: Vec<String> = version.iter().map(u64::to_string).collect();
        subjects.push(Subject {
            name: format!("{package}@{}", version.join(".")),
            path: newest,
            previous,
            component_of: None,
            source_edits: Vec::new(),
        });
    }
    subjects.extend(subjects_with_edits);
    Ok((subjects, families))
}

/// A program rebuilt after each of its source edits (scripts/build-c-corpus): `original.wasm`
/// and one module per edit.
fn source_edits(program: &str, dir: &Path) -> Result<Subject> {
    let mut edits = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().to_string()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "wasm") && stem != "original" {
            edits.push((stem, path));
        }
    }
    edits.sort();
    let name = match program.rsplit_once('-') {
        Some((package, version)) => format!("{package}@{version} (C source edits)"),
        None => format!("{program} (C source edits)"),
    };
    Ok(Subject {
        name,
        path: dir.join("original.wasm"),
        previous: None,
        component_of: None,
        source_edits: edits,
    })
}
