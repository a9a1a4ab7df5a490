//! `llava eval` on the committed example set (examples/eval) and the bundled tiny model. Its
//! answers are random words, so the scores are checked with a small normalizer of this test's
//! own, and with reference answers built from the model's answers; a second run with the same
//! output file asks nothing again.

use std::path::Path;
use std::process::Output;

mod common;

use common::{llava, root};
use serde_json::{Value, json};

fn ok_json(out: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "llava failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn jsonl(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_jsonl(path: &Path, rows: &[Value]) {
    std::fs::write(
        path,
        rows.iter().map(|r| format!("{r}\n")).collect::<String>(),
    )
    .unwrap();
}

/// A plainer take on the VQA normalization than the command's (enough for these answers):
/// lowercase; punctuation other than periods and apostrophes becomes a space; periods not before
/// a digit go; number words become digits; articles go.
fn normalize(s: &str) -> String {
    let lower: Vec<char> = s.to_lowercase().chars().collect();
    let mut text = String::new();
    for (i, &c) in lower.iter().enumerate() {
        match c {
            '.' if !lower.get(i + 1).is_some_and(|n| n.is_ascii_digit()) => {}
            '.' | '\'' => text.push(c),
            c if c.is_ascii_punctuation() => text.push(' '),
            c => text.push(c),
        }
    }
    let numbers = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    ];
    text.split_whitespace()
        .filter(|w| !["a", "an", "the"].contains(w))
        .map(|w| match numbers.iter().position(|n| n == &w) {
            Some(d) => d.to_string(),
            None if w == "none" => "0".to_string(),
            None => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// This test's expected score of one answer to one question line.
fn expected_score(question: &Value, text: &str) -> Option<f64> {
    let answer = question.get("answer")?;
    let accepted: Vec<&str> = match answer {
        Value::String(s) => vec![s],
        Value::Array(a) => a.iter().map(|v| v.as_str().unwrap()).collect(),
        _ => panic!("{answer}"),
    };
    let right = match question.get("choices").and_then(Value::as_array) {
        None => accepted.iter().any(|a| normalize(a) == normalize(text)),
        Some(choices) => {
            let letters = ["A", "B", "C", "D", "E"];
            let want = letters
                .iter()
                .position(|l| *l == accepted[0])
                .unwrap_or_else(|| {
                    choices
                        .iter()
                        .position(|c| normalize(c.as_str().unwrap()) == normalize(accepted[0]))
                        .unwrap()
                });
            let t = text.trim().trim_start_matches('(');
            let by_letter = letters[..choices.len()].iter().position(|l| {
                t.starts_with(l) && !t[1..].chars().next().is_some_and(char::is_alphanumeric)
            });
            let chosen = by_letter.or_else(|| {
                choices
                    .iter()
                    .position(|c| normalize(c.as_str().unwrap()) == normalize(text))
            });
            chosen == Some(want)
        }
    };
    Some(if right { 1.0 } else { 0.0 })
}

fn check_summary(summary: &Value, questions: &[Value], answers: &[Value]) {
    let scores: Vec<f64> = questions
        .iter()
        .filter_map(|q| {
            let text = answers
                .iter()
                .find(|a| a["question_id"] == q["question_id"])
                .unwrap()["text"]
                .as_str()
                .unwrap();
            expected_score(q, text)
        })
        .collect();
    let correct: f64 = scores.iter().sum();
    assert_eq!(summary["scored"], json!(scores.len()));
    assert_eq!(summary["correct"].as_f64().unwrap(), correct, "{summary}");
    assert!((summary["accuracy"].as_f64().unwrap() - correct / scores.len() as f64).abs() < 1e-12);
}

#[test]
fn eval_scores_the_example_set_and_resumes_without_new_work() {
    let dir = tempfile::tempdir().unwrap();
    let questions_path = root().join("examples/eval/questions.jsonl");
    let questions = jsonl(&questions_path);
    let output = dir.path().join("answers.jsonl");
    let run = |questions: &Path| {
        llava(&[
            "eval",
            "--questions",
            questions.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--max-new-tokens",
            "4",
            "--json",
        ])
    };
    let first = run(&questions_path);
    let summary = ok_json(&first);
    assert_eq!(
        (
            summary["questions"].as_u64(),
            summary["answered"].as_u64(),
            summary["skipped"].as_u64()
        ),
        (Some(6), Some(6), Some(0))
    );
    // One progress line per question on stderr (not a terminal here), with tokens/s.
    let progress = String::from_utf8_lossy(&first.stderr);
    assert_eq!(
        progress
            .lines()
            .filter(|l| l.starts_with('[') && l.contains("tokens/s"))
            .count(),
        6,
        "{progress}"
    );
    let answers = jsonl(&output);
    assert_eq!(
        answers
            .iter()
            .map(|a| &a["question_id"])
            .collect::<Vec<_>>(),
        questions
            .iter()
            .map(|q| &q["question_id"])
            .collect::<Vec<_>>()
    );
    check_summary(&summary, &questions, &answers);
    // Four questions about one picture: the vision tower ran for the first only.
    let cached: Vec<bool> = answers
        .iter()
        .map(|a| a["image_cached"].as_bool().unwrap())
        .collect();
    assert_eq!(cached, [false, true, true, true, false, false]);

    // The answer is `llava run`'s for the same prompt (the default template) and image.
    let roof = &answers[0];
    assert_eq!(
        roof["prompt"],
        "What colour is the roof of the house?\nAnswer the question using a single word or phrase."
    );
    let image = root().join("assets/sample.jpg");
    let alone = ok_json(&llava(&[
        "run",
        "--json",
        "--max-new-tokens",
        "4",
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        roof["prompt"].as_str().unwrap(),
    ]));
    assert_eq!(roof["text"], alone["text"]);
    assert_eq!(
        roof["tokens"],
        json!(alone["tokens"].as_array().unwrap().len())
    );
    // Multiple choice: the options as LLaVA asks them.
    assert_eq!(
        answers[4]["prompt"],
        "Which shape is blue?\nA. circle\nB. square\nC. triangle\nAnswer with the option's letter from the given choices directly."
    );

    // Same output file: nothing asked again, nothing written, the same scores.
    let before = std::fs::read(&output).unwrap();
    let again = ok_json(&run(&questions_path));
    assert_eq!(
        (again["answered"].as_u64(), again["skipped"].as_u64()),
        (Some(0), Some(6))
    );
    assert_eq!(again["tokens_per_s"], Value::Null);
    assert_eq!(std::fs::read(&output).unwrap(), before);
    assert_eq!(again["correct"], summary["correct"]);

    // References built from the model's own answers, dressed up as people write them (an
    // article, capitals, a full stop): 3 right, 2 wrong, 1 unscored. Scored from the same output
    // file, so again without new work.
    let rescored: Vec<Value> = questions
        .iter()
        .zip(&answers)
        .enumerate()
        .map(|(i, (q, a))| {
            let mut q = q.clone();
            let text = a["text"].as_str().unwrap();
            match i {
                0 | 3 => q["answer"] = json!(format!("The {}.", text.to_uppercase())),
                1 => q["answer"] = json!(["zzz", format!("  {text}\n")]),
                2 => q["answer"] = json!("D"),
                4 => q["choices"] = json!([format!("an {text}"), "circle"]),
                _ => q
                    .as_object_mut()
                    .unwrap()
                    .remove("answer")
                    .map(drop)
                    .unwrap(),
            }
            if i == 4 {
                q["answer"] = json!("A");
            }
            q
        })
        .collect();
    let rescored_path = dir.path().join("rescored.jsonl");
    write_jsonl(&rescored_path, &rescored);
    let summary = ok_json(&run(&rescored_path));
    assert_eq!(summary["answered"].as_u64(), Some(0));
    check_summary(&summary, &rescored, &answers);
    assert_eq!(summary["scored"], 5);

    // An interrupted run: two answers and half a line. The half line is dropped and the four
    // missing questions asked again, with the same (greedy) answers.
    let text = String::from_utf8(before).unwrap();
    let keep: String = text
        .lines()
        .take(2)
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        + "{\"question_id\": \"tr";
    std::fs::write(&output, keep).unwrap();
    let resumed = ok_json(&run(&questions_path));
    assert_eq!(
        (resumed["answered"].as_u64(), resumed["skipped"].as_u64()),
        (Some(4), Some(2))
    );
    let texts = |rows: &[Value]| rows.iter().map(|a| a["text"].clone()).collect::<Vec<_>>();
    assert_eq!(texts(&jsonl(&output)), texts(&answers));
}

#[test]
fn eval_reads_the_llava_layout_with_a_separate_answers_file_and_a_template() {
    let dir = tempfile::tempdir().unwrap();
    let examples = root().join("examples/eval");
    let output = dir.path().join("out.jsonl");
    let summary = ok_json(&llava(&[
        "eval",
        "--questions",
        examples.join("llava-questions.jsonl").to_str().unwrap(),
        "--answers",
        examples.join("llava-answers.jsonl").to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--template",
        "Q: {question}",
        "--max-new-tokens",
        "3",
        "--json",
    ]));
    let answers = jsonl(&output);
    assert_eq!(
        answers
            .iter()
            .map(|a| a["question_id"].clone())
            .collect::<Vec<_>>(),
        [json!(1), json!(2)]
    );
    let questions = jsonl(&examples.join("llava-questions.jsonl"));
    for (q, a) in questions.iter().zip(&answers) {
        assert_eq!(
            a["prompt"],
            json!(format!("Q: {}", q["text"].as_str().unwrap()))
        );
    }
    // The references come from the answers file.
    let with_answers: Vec<Value> = jsonl(&examples.join("llava-answers.jsonl"))
        .into_iter()
        .map(|a| json!({ "question_id": a["question_id"], "answer": a["answer"] }))
        .collect();
    check_summary(&summary, &with_answers, &answers);
    assert_eq!(summary["scored"], 2);
    assert_eq!(answers[1]["image_cached"], true);
}

#[test]
fn eval_bad_input_names_the_file_line_and_rule() {
    let dir = tempfile::tempdir().unwrap();
    let bad = [
        ("{\"question\": \"hi\"}\nnot json\n", "line 2"),
        ("{\"image\": \"x.png\"}\n", "needs \"question\""),
        (
            "{\"question\": \"hi\", \"choices\": [\"a\", \"b\"], \"answer\": \"C\"}\n",
            "neither an option letter",
        ),
        (
            "{\"id\": 1, \"question\": \"a\"}\n{\"id\": 1, \"question\": \"b\"}\n",
            "appears twice",
        ),
        (
            "{\"question\": \"hi\", \"image\": \"missing.png\"}\n",
            "missing.png",
        ),
    ];
    for (i, (content, needle)) in bad.iter().enumerate() {
        let path = dir.path().join(format!("q{i}.jsonl"));
        std::fs::write(&path, content).unwrap();
        let out = llava(&[
            "eval",
            "--questions",
            path.to_str().unwrap(),
            "--output",
            dir.path().join("o.jsonl").to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{content}");
        assert!(
            err.contains("error:") && err.contains(needle),
            "{content}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let out = llava(&[
        "eval",
        "--questions",
        "q.jsonl",
        "--output",
        "o.jsonl",
        "--template",
        "no placeholder",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--template must contain {question}"));
}
