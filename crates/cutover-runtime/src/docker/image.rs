//! Images: making sure a version's image is on the Engine before its first container starts
//! (present, else built from the service's build context, else pulled, else a clear error),
//! and building small images from local executables (the demo and tests: `FROM scratch`, the
//! program and the shared libraries `ldd` lists for it; no registry is needed).
//!
//! Build contexts are sent as a tar stream through the Engine's build API. What the context's
//! `.dockerignore` lists is left out, and so is the daemon's state dir when it lies inside the
//! context: it holds `state.db` with `--env` values, which must never end up in an image.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::{BuildImageOptionsBuilder, CreateImageOptionsBuilder};
use futures_util::StreamExt;

use crate::RuntimeError;

/// How many lines of a failed build's output go into its error.
const BUILD_TAIL: usize = 15;

/// What is missing an image may do about it.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// Build from this context (absolute) with this Dockerfile (relative to it).
    pub build: Option<(PathBuf, String)>,
    pub pull: bool,
    /// Left out of a build context (the daemon's state dir).
    pub exclude: Vec<PathBuf>,
    /// Labels the built image gets.
    pub labels: HashMap<String, String>,
}

fn engine_error(what: &str, e: &bollard::errors::Error) -> RuntimeError {
    RuntimeError::Docker(format!("{what}: {}", super::engine_message(e)))
}

/// Whether the Engine has `image`.
pub async fn exists(docker: &Docker, image: &str) -> Result<bool, RuntimeError> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(e) => Err(engine_error(&format!("cannot look up image {image}"), &e)),
    }
}

/// Makes sure the Engine has `image`: present, built, or pulled; otherwise an error that names
/// the image and what to do. `service` and `host` are only for the message.
pub async fn ensure(
    docker: &Docker,
    image: &str,
    source: &Source,
    service: &str,
    host: &str,
) -> Result<(), RuntimeError> {
    if exists(docker, image).await? {
        return Ok(());
    }
    if let Some((context, dockerfile)) = &source.build {
        let tar = {
            let (context, exclude) = (context.clone(), source.exclude.clone());
            tokio::task::spawn_blocking(move || context_tar(&context, &exclude))
                .await
                .map_err(|e| RuntimeError::Docker(format!("the build context task failed: {e}")))?
        }
        .map_err(|e| {
            RuntimeError::Docker(format!(
                "cannot read the build context {} for {image}: {e}",
                context.display()
            ))
        })?;
        let t0 = std::time::Instant::now();
        tracing::info!(%image, context = %context.display(), "building a missing image");
        let built = build(docker, image, dockerfile, tar, &source.labels).await;
        if built.is_ok() {
            tracing::info!(%image, seconds = t0.elapsed().as_secs_f64(), "built");
        }
        return built.map_err(|e| match e {
            RuntimeError::Docker(m) => RuntimeError::Docker(format!(
                "building {image} from {} failed: {m}",
                context.display()
            )),
            other => other,
        });
    }
    if source.pull {
        let t0 = std::time::Instant::now();
        tracing::info!(%image, "pulling a missing image");
        pull(docker, image).await?;
        tracing::info!(%image, seconds = t0.elapsed().as_secs_f64(), "pulled");
        return Ok(());
    }
    Err(RuntimeError::Docker(format!(
        "image {image} is not on the Docker Engine at {host}, and service {service} neither builds nor pulls it: build it (docker build -t {image} .), or set build = \".\" or pull = true in [services.{service}.docker]"
    )))
}

/// Builds `image` from a tar of its context; the error carries the build output's last lines.
pub async fn build(
    docker: &Docker,
    image: &str,
    dockerfile: &str,
    tar: Vec<u8>,
    labels: &HashMap<String, String>,
) -> Result<(), RuntimeError> {
    let options = BuildImageOptionsBuilder::default()
        .dockerfile(dockerfile)
        .t(image)
        .rm(true)
        .forcerm(true)
        .labels(labels)
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(tar.into())));
    let mut tail: VecDeque<String> = VecDeque::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(text) = info.stream {
                    for line in text.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
                        if tail.len() == BUILD_TAIL {
                            tail.pop_front();
                        }
                        tail.push_back(line.to_owned());
                    }
                }
            }
            Err(e) => {
                let output = tail.into_iter().collect::<Vec<_>>().join(" ⏎ ");
                return Err(RuntimeError::Docker(format!(
                    "{}{}",
                    super::engine_message(&e),
                    if output.is_empty() {
                        String::new()
                    } else {
                        format!("; the build's last output: {output}")
                    }
                )));
            }
        }
    }
    // A build can end without an error and without the image (a stream cut short).
    if exists(docker, image).await? {
        Ok(())
    } else {
        Err(RuntimeError::Docker(format!(
            "the build of {image} ended without the image; its last output: {}",
            tail.into_iter().collect::<Vec<_>>().join(" ⏎ ")
        )))
    }
}

/// Removes the images that carry `label` and that no tag names any more (the ones a rebuild
/// under the same tag left behind), unless a container uses them. Returns the bytes freed.
pub async fn prune_untagged(docker: &Docker, label: &str) -> Result<i64, RuntimeError> {
    let filters = HashMap::from([
        ("dangling", vec!["true".to_owned()]),
        ("label", vec![label.to_owned()]),
    ]);
    let options = bollard::query_parameters::PruneImagesOptionsBuilder::default()
        .filters(&filters)
        .build();
    docker
        .prune_images(Some(options))
        .await
        .map(|r| r.space_reclaimed.unwrap_or(0))
        .map_err(|e| engine_error("cannot remove old images", &e))
}

/// Pulls `image` from its registry.
async fn pull(docker: &Docker, image: &str) -> Result<(), RuntimeError> {
    let options = CreateImageOptionsBuilder::default()
        .from_image(image)
        .build();
    let mut stream = docker.create_image(Some(options), None, None);
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            return Err(engine_error(&format!("pulling {image} failed"), &e));
        }
    }
    if exists(docker, image).await? {
        Ok(())
    } else {
        Err(RuntimeError::Docker(format!(
            "pulling {image} ended without the image"
        )))
    }
}

/// The build context at `dir` as a tar archive, without what `.dockerignore` lists and without
/// the paths in `exclude`. Symbolic links are archived as links, as `docker build` does.
pub fn context_tar(dir: &Path, exclude: &[PathBuf]) -> std::io::Result<Vec<u8>> {
    let ignore = std::fs::read_to_string(dir.join(".dockerignore"))
        .map(|t| Ignore::parse(&t))
        .unwrap_or_default();
    let exclude: Vec<PathBuf> = exclude
        .iter()
        .map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let root = std::fs::canonicalize(dir)?;
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    // The Engine refuses GNU sparse entries (a linker's output often has holes).
    b.sparse(false);
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let path = e.path();
            let Ok(rel) = path.strip_prefix(&root) else {
                continue;
            };
            let rel_text = rel.to_string_lossy();
            if exclude.iter().any(|x| path.starts_with(x)) || ignore.ignores(&rel_text) {
                continue;
            }
            let kind = e.file_type()?;
            b.append_path_with_name(&path, rel)?;
            if kind.is_dir() {
                stack.push(path);
            }
        }
    }
    b.into_inner()
}

/// The patterns of a `.dockerignore`: `*`, `?` and `**` globs on slash-separated paths
/// relative to the context, `!` to take a path back; the last matching line wins, and a
/// directory that is left out takes everything in it along.
#[derive(Debug, Default)]
pub struct Ignore {
    rules: Vec<(bool, Vec<String>)>,
}

impl Ignore {
    pub fn parse(text: &str) -> Ignore {
        let rules = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (keep, pat) = match l.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, l),
                };
                let pat = pat.trim_start_matches("./").trim_matches('/');
                (
                    keep,
                    pat.split('/')
                        .filter(|s| !s.is_empty() && *s != ".")
                        .map(str::to_owned)
                        .collect(),
                )
            })
            .filter(|(_, p): &(bool, Vec<String>)| !p.is_empty())
            .collect();
        Ignore { rules }
    }

    /// Whether `rel` (slash-separated, relative to the context) is left out.
    pub fn ignores(&self, rel: &str) -> bool {
        let parts: Vec<&str> = rel.split('/').filter(|s| !s.is_empty()).collect();
        let mut ignored = false;
        for (keep, pat) in &self.rules {
            // A pattern that matches the path or one of its parent directories.
            let hit = (1..=parts.len()).any(|n| glob_path(pat, &parts[..n]));
            if hit {
                ignored = !keep;
            }
        }
        ignored
    }
}

/// Whether the path segments match the pattern segments (`**` spans any number of them).
fn glob_path(pat: &[String], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((p, rest)) if p == "**" => (0..=path.len()).any(|i| glob_path(rest, &path[i..])),
        Some((p, rest)) => match path.split_first() {
            Some((s, more)) => glob_segment(p.as_bytes(), s.as_bytes()) && glob_path(rest, more),
            None => false,
        },
    }
}

/// `*` and `?` within one path segment.
fn glob_segment(p: &[u8], s: &[u8]) -> bool {
    match (p.split_first(), s.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => (0..=s.len()).any(|i| glob_segment(rest, &s[i..])),
        (Some((b'?', rest)), Some((_, more))) => glob_segment(rest, more),
        (Some((c, rest)), Some((d, more))) if c == d => glob_segment(rest, more),
        _ => false,
    }
}

/// The shared libraries in `ldd`'s output (the dynamic loader included), or the one it did
/// not find.
pub fn ldd_paths(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut paths = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not a dynamic executable") || line.starts_with("statically linked") {
            continue;
        }
        if let Some((name, target)) = line.split_once("=>") {
            let target = target.trim();
            if target.starts_with("not found") {
                return Err(format!("ldd found no {}", name.trim()));
            }
            if let Some(p) = target
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
            {
                paths.push(PathBuf::from(p));
            }
        } else if let Some(p) = line
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            paths.push(PathBuf::from(p));
        }
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

/// A context for a `FROM scratch` image: each `(host path, path in the image)` program with
/// the shared libraries `ldd` lists for it (at the paths it lists), and a Dockerfile with
/// `entrypoint`.
pub fn executables_tar(
    files: &[(PathBuf, String)],
    entrypoint: &[String],
) -> std::io::Result<Vec<u8>> {
    let mut libs: Vec<PathBuf> = Vec::new();
    for (host, _) in files {
        let out = std::process::Command::new("ldd")
            .arg(host)
            .output()
            .map_err(|e| {
                std::io::Error::other(format!(
                    "cannot run ldd (from libc-bin) on {}: {e}",
                    host.display()
                ))
            })?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        libs.extend(ldd_paths(&text).map_err(std::io::Error::other)?);
    }
    libs.sort();
    libs.dedup();
    let mut b = tar::Builder::new(Vec::new());
    // The Engine refuses GNU sparse entries (a linker's output often has holes).
    b.sparse(false);
    let quoted: Vec<String> = entrypoint.iter().map(|a| format!("{a:?}")).collect();
    let dockerfile = format!(
        "FROM scratch\nCOPY . /\nENTRYPOINT [{}]\n",
        quoted.join(", ")
    );
    let mut add_text = |name: &str, text: &str| -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, text.as_bytes())
    };
    add_text("Dockerfile", &dockerfile)?;
    add_text(".dockerignore", "Dockerfile\n.dockerignore\n")?;
    for (host, inside) in files {
        b.append_path_with_name(host, inside.trim_start_matches('/'))?;
    }
    for lib in &libs {
        // The file the link points to, under the name the loader looks for.
        let mut f = std::fs::File::open(lib)?;
        b.append_file(lib.to_string_lossy().trim_start_matches('/'), &mut f)?;
    }
    b.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_becomes_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            ldd_paths(out).unwrap(),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(
            ldd_paths("\tnot a dynamic executable\n")
                .unwrap()
                .is_empty()
        );
        assert!(ldd_paths("\tstatically linked\n").unwrap().is_empty());
        assert_eq!(
            ldd_paths("\tlibfoo.so.1 => not found\n").unwrap_err(),
            "ldd found no libfoo.so.1"
        );
    }

    #[test]
    fn dockerignore_patterns() {
        let ig = Ignore::parse(
            "# comment\n.git\ntarget/\n*.log\n**/secret.txt\ndocs/*.md\n!docs/keep.md\n./tmp\n",
        );
        let cases = [
            (".git", true),
            (".git/config", true),
            ("target/debug/app", true),
            ("app.log", true),
            ("sub/app.log", false),
            ("a/b/secret.txt", true),
            ("secret.txt", true),
            ("docs/intro.md", true),
            ("docs/keep.md", false),
            ("docs/img/x.md", false),
            ("tmp/x", true),
            ("src/main.rs", false),
            ("Dockerfile", false),
        ];
        for (path, want) in cases {
            assert_eq!(ig.ignores(path), want, "{path}");
        }
        assert!(!Ignore::parse("").ignores("anything"));
    }

    #[test]
    fn a_context_leaves_out_ignored_files_and_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join(".cutover")).unwrap();
        std::fs::write(p.join(".cutover/state.db"), "secrets").unwrap();
        std::fs::create_dir_all(p.join("src")).unwrap();
        std::fs::write(p.join("src/app.sh"), "echo hi").unwrap();
        std::fs::write(p.join("Dockerfile"), "FROM scratch").unwrap();
        std::fs::write(p.join("debug.log"), "x").unwrap();
        std::fs::write(p.join(".dockerignore"), "*.log\n").unwrap();
        std::os::unix::fs::symlink("src/app.sh", p.join("link")).unwrap();
        let tar = context_tar(p, &[p.join(".cutover")]).unwrap();
        let mut names: Vec<String> = tar::Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [".dockerignore", "Dockerfile", "link", "src", "src/app.sh"]
        );
    }
}
