//! Hostile arguments and files given to `llava`: each is refused with an error that names the
//! argument or file and the rule, never a panic, a hang or unbounded memory; and a chat goes on
//! after every per-turn error.

use std::path::PathBuf;
use std::process::{Command, Stdio};

mod common;

use common::{case, image, llava, root};
use serde_json::Value;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llava-cli-hostile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The bundled model's small files, with `preprocessor_config.json` replaced.
fn model_with_preprocessor(preprocessor: &str) -> PathBuf {
    let dir = temp_dir("pinpoints");
    let bundled = root().join("tests/fixtures/models/mistral-tiny");
    for file in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(bundled.join(file), dir.join(file)).unwrap();
    }
    std::fs::write(dir.join("preprocessor_config.json"), preprocessor).unwrap();
    dir
}

#[test]
fn hostile_arguments_and_files_give_clear_errors() {
    let dir = temp_dir("files");
    let fifo = dir.join("fifo.png");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let converted = dir.join("converted");
    std::fs::create_dir_all(&converted).unwrap();
    std::fs::write(converted.join("manifest.json"), "{}").unwrap();
    std::fs::write(converted.join("config.json"), "{}").unwrap();
    let huge_config = dir.join("config.json");
    std::fs::write(
        &huge_config,
        r#"{"model_type": "llava_next", "text_config": {"hidden_size": 1099511627776}}"#,
    )
    .unwrap();
    // A few bytes edited: one pinpoint of 40 x 40 tiles of 336 pixels.
    let pinpoints =
        model_with_preprocessor(r#"{"image_grid_pinpoints": [[336, 672], [13440, 13440]]}"#);
    let logo = image("logo.png");
    let (logo, dir_s, fifo_s) = (
        logo.to_str().unwrap(),
        dir.to_str().unwrap(),
        fifo.to_str().unwrap(),
    );

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["preprocess", "--image", "/dev/zero"],
            "--image /dev/zero: is not a regular file",
        ),
        (
            vec!["preprocess", "--image", dir_s],
            "is a directory, not an image file",
        ),
        (
            vec!["preprocess", "--image", fifo_s],
            "fifo.png: is not a regular file",
        ),
        (
            vec![
                "preprocess",
                "--model",
                pinpoints.to_str().unwrap(),
                "--image",
                logo,
            ],
            "preprocessor_config.json: invalid image config: image_grid_pinpoints entry [13440, 13440] makes 1600 tiles",
        ),
        (
            vec!["run", "--prompt", "hi", "--temperature", "NaN"],
            "generation parameter `temperature` is NaN",
        ),
        (
            vec!["run", "--prompt", "hi", "--temperature=-1"],
            "`temperature` is -1.0; it must be a finite number >= 0",
        ),
        (
            vec!["run", "--prompt", "hi", "--repetition-penalty", "0"],
            "`repetition_penalty` is 0.0",
        ),
        (
            vec!["run", "--prompt", "hi", "--top-p", "0"],
            "`top_p` is 0.0; it must be in (0, 1]",
        ),
        (
            vec!["run", "--prompt", "hi", "--stop", ""],
            "`stop` is [\"\"]; it must be non-empty strings",
        ),
        (
            vec![
                "convert",
                "--quant",
                "q4",
                "--input",
                dir_s,
                "--dry-run",
                "--shard-mb",
                "18446744073709551615",
            ],
            "--shard-mb must be between 1 and",
        ),
        (
            vec![
                "convert",
                "--quant",
                "q4",
                "--input",
                dir_s,
                "--dry-run",
                "--shard-mb",
                "0",
            ],
            "--shard-mb must be between 1 and",
        ),
        (
            vec![
                "convert",
                "--quant",
                "q4",
                "--input",
                huge_config.to_str().unwrap(),
                "--dry-run",
            ],
            "key `text_config.hidden_size`: 1099511627776 must be between 1 and 65536",
        ),
        (
            vec![
                "convert",
                "--quant",
                "q4",
                "--input",
                converted.to_str().unwrap(),
                "--output",
                dir_s,
            ],
            "is already a converted folder (it has manifest.json)",
        ),
    ];
    for (args, needle) in cases {
        let out = llava(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            err.contains("error:") && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::remove_dir_all(&pinpoints).unwrap();
}

#[test]
fn a_full_context_and_zero_new_tokens_are_replies_not_errors() {
    let case = case("text_only");
    let question = case["question"].as_str().unwrap();
    let prompt_tokens = case["input_ids"].as_array().unwrap().len();
    let context = (prompt_tokens + 3).to_string();
    let out = llava(&[
        "run",
        "--prompt",
        question,
        "--context",
        &context,
        "--ignore-eos",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["stop_reason"], "context_full");
    assert_eq!(
        reply["tokens"].as_array().unwrap()[..],
        case["greedy_tokens"].as_array().unwrap()[..4]
    );
    assert!(
        case["greedy_text"]
            .as_str()
            .unwrap()
            .starts_with(reply["text"].as_str().unwrap())
    );

    let out = llava(&[
        "run",
        "--prompt",
        question,
        "--max-new-tokens",
        "0",
        "--json",
    ]);
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            reply["stop_reason"].as_str(),
            reply["tokens"].as_array().unwrap().len()
        ),
        (Some("max_tokens"), 0)
    );
}

/// An over-long message and a typed `<image>` are reported and the chat goes on: the questions
/// after them get transformers' answers for the conversation without them.
#[test]
fn a_chat_goes_on_after_per_turn_errors() {
    use std::io::Write;
    let case = case("multi_turn");
    let mut child = Command::new(env!("CARGO_BIN_EXE_llava"))
        .args([
            "chat",
            "--image",
            image(case["image"].as_str().unwrap()).to_str().unwrap(),
        ])
        .args(["--max-new-tokens", "16", "--ignore-eos"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let long = "sea ".repeat(5000);
    let questions = format!(
        "{long}\n{}\n<image> again?\n{}\n\n",
        case["turn1"]["question"].as_str().unwrap(),
        case["question"].as_str().unwrap()
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(questions.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let turns: Vec<&str> = stdout.split("> ").skip(1).collect();
    assert_eq!(turns.len(), 5, "{stdout}");
    assert!(
        turns[0].starts_with("\nerror: the prompt needs") && turns[0].contains("(use /reset)"),
        "{}",
        turns[0]
    );
    assert!(
        turns[2].starts_with("\nerror: the message contains the text `<image>`"),
        "{}",
        turns[2]
    );
    let answer = |turn: &str| turn.split("\n[").next().unwrap().to_string();
    assert_eq!(
        answer(turns[1]),
        case["turn1"]["greedy_text"].as_str().unwrap()
    );
    assert_eq!(answer(turns[3]), case["greedy_text"].as_str().unwrap());
}
