//! `llava eval`: answers a JSON Lines set of questions about images, writes the answers as JSON
//! Lines and scores them: exact match after the VQA evaluation's answer normalization
//! (GT-Vision-Lab/VQA, vqaEval.py), or the chosen option for multiple choice. Resumable: the
//! questions already in the output file are not asked again.
//!
//! Question lines, either layout:
//! - `{"image": path, "question": text, "answer": text or [accepted texts], "choices": [texts]}`
//!   (`image`, `answer`, `choices` optional; `question_id` or `id` optional, else the line number);
//! - LLaVA's `question.jsonl`: `{"question_id", "image", "text"}`, with the answers in a separate
//!   JSON Lines file of `{"question_id", "answer"}` (`--answers`) or none.
//!
//! Image paths are relative to the questions file (or to `--image-folder`).

use std::collections::{HashMap, HashSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::Args;
use llava_model::generate::Turn;
use serde_json::{Value, json};

use crate::{CliResult, ModelArgs, SamplingArgs, load, print_kernel_times, read_image};

/// LLaVA's instruction for short open answers (its VQAv2/GQA/TextVQA question files end with it).
pub const DEFAULT_TEMPLATE: &str = "{question}\nAnswer the question using a single word or phrase.";
/// LLaVA's instruction for multiple choice (MMBench, ScienceQA); `{choices}` is one `A. text` a line.
pub const DEFAULT_CHOICE_TEMPLATE: &str =
    "{question}\n{choices}\nAnswer with the option's letter from the given choices directly.";

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Questions, one JSON object a line (see `llava eval --help`).
    #[arg(long)]
    questions: PathBuf,
    /// Reference answers for LLaVA-layout questions: JSON Lines of {"question_id", "answer"}.
    #[arg(long)]
    answers: Option<PathBuf>,
    /// The model's answers, JSON Lines (appended to: questions already in it are skipped).
    #[arg(long)]
    output: PathBuf,
    /// Folder the image paths are relative to (default: the questions file's folder).
    #[arg(long)]
    image_folder: Option<PathBuf>,
    /// How an open question is asked; {question} is its text. Default: DEFAULT_TEMPLATE for
    /// "question" lines, the text as it is for LLaVA "text" lines (they carry their instruction).
    #[arg(long)]
    template: Option<String>,
    /// How a multiple-choice question is asked; {question} and {choices} are replaced.
    #[arg(long, default_value = DEFAULT_CHOICE_TEMPLATE)]
    choice_template: String,
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// What counts as right.
#[derive(Debug, PartialEq)]
enum Reference {
    /// Any of these texts, compared after [`normalize_vqa`].
    Accepted(Vec<String>),
    /// The index of the right option.
    Choice(usize),
}

struct Question {
    /// The id as written to the output (`question_id`, `id` or the line number) ...
    id: Value,
    /// ... and as compared.
    key: String,
    image: Option<PathBuf>,
    text: String,
    /// A LLaVA `text` line: asked as it is unless `--template` says otherwise.
    llava_layout: bool,
    choices: Vec<String>,
    reference: Option<Reference>,
}

fn id_key(id: &Value) -> Option<String> {
    match id {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn option_letter(i: usize) -> char {
    (b'A' + i as u8) as char
}

impl Question {
    fn prompt(&self, template: Option<&str>, choice_template: &str) -> String {
        if !self.choices.is_empty() {
            let choices: Vec<String> = self
                .choices
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{}. {c}", option_letter(i)))
                .collect();
            return choice_template
                .replace("{question}", &self.text)
                .replace("{choices}", &choices.join("\n"));
        }
        match (template, self.llava_layout) {
            (Some(t), _) => t.replace("{question}", &self.text),
            (None, true) => self.text.clone(),
            (None, false) => DEFAULT_TEMPLATE.replace("{question}", &self.text),
        }
    }

    fn score(&self, prediction: &str) -> Option<f64> {
        let hit = match self.reference.as_ref()? {
            Reference::Accepted(texts) => {
                let predicted = normalize_vqa(prediction);
                texts.iter().any(|t| normalize_vqa(t) == predicted)
            }
            Reference::Choice(right) => chosen_option(prediction, &self.choices) == Some(*right),
        };
        Some(f64::from(u8::from(hit)))
    }
}

/// JSON Lines of `path` as (line number, object); blank lines are skipped.
fn json_lines(path: &Path) -> CliResult<Vec<(usize, serde_json::Map<String, Value>)>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(Value::Object(map)) => rows.push((i + 1, map)),
            Ok(_) => {
                return Err(format!("{} line {}: not a JSON object", path.display(), i + 1).into());
            }
            Err(e) => return Err(format!("{} line {}: {e}", path.display(), i + 1).into()),
        }
    }
    Ok(rows)
}

/// A reference answer: a string, or a non-empty list of strings (any of them is right).
fn accepted(value: &Value) -> Option<Vec<String>> {
    match value {
        Value::String(s) => Some(vec![s.clone()]),
        Value::Array(items) if !items.is_empty() => {
            items.iter().map(|v| v.as_str().map(String::from)).collect()
        }
        _ => None,
    }
}

fn read_questions(args: &EvalArgs) -> CliResult<Vec<Question>> {
    let path = &args.questions;
    let folder = match &args.image_folder {
        Some(folder) => folder.clone(),
        None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let mut answers = HashMap::new();
    if let Some(answers_path) = &args.answers {
        for (line, row) in json_lines(answers_path)? {
            let at = || format!("{} line {line}", answers_path.display());
            let key = row
                .get("question_id")
                .and_then(id_key)
                .ok_or_else(|| format!("{}: no \"question_id\"", at()))?;
            let answer = row
                .get("answer")
                .ok_or_else(|| format!("{}: no \"answer\"", at()))?
                .clone();
            answers.insert(key, answer);
        }
    }
    let mut questions = Vec::new();
    let mut seen = HashSet::new();
    for (line, row) in json_lines(path)? {
        let at = || format!("{} line {line}", path.display());
        let id = row
            .get("question_id")
            .or_else(|| row.get("id"))
            .cloned()
            .unwrap_or_else(|| json!(line));
        let key = id_key(&id)
            .ok_or_else(|| format!("{}: the question id must be a string or a number", at()))?;
        if !seen.insert(key.clone()) {
            return Err(format!("{}: question id {key} appears twice", at()).into());
        }
        let (text, llava_layout) = match (row.get("question"), row.get("text")) {
            (Some(Value::String(q)), _) => (q.clone(), false),
            (None, Some(Value::String(t))) => (t.clone(), true),
            _ => {
                return Err(format!(
                    "{}: needs \"question\" (or LLaVA's \"text\") as a string",
                    at()
                )
                .into());
            }
        };
        let image = match row.get("image") {
            None | Some(Value::Null) => None,
            Some(Value::String(p)) => Some(folder.join(p)),
            Some(_) => return Err(format!("{}: \"image\" must be a path string", at()).into()),
        };
        let choices: Vec<String> = match row.get("choices") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) if (2..=26).contains(&items.len()) => items
                .iter()
                .map(|v| v.as_str().map(String::from))
                .collect::<Option<_>>()
                .ok_or_else(|| format!("{}: \"choices\" must be strings", at()))?,
            Some(_) => {
                return Err(
                    format!("{}: \"choices\" must be a list of 2 to 26 strings", at()).into(),
                );
            }
        };
        let answer = row.get("answer").or_else(|| answers.get(&key));
        let reference = match answer {
            None | Some(Value::Null) => None,
            Some(value) => {
                let texts = accepted(value).ok_or_else(|| {
                    format!("{}: \"answer\" must be a string or a list of strings", at())
                })?;
                if choices.is_empty() {
                    Some(Reference::Accepted(texts))
                } else {
                    let right = reference_option(&texts[0], &choices).ok_or_else(|| {
                        format!("{}: the answer {:?} is neither an option letter nor one of the choices", at(), texts[0])
                    })?;
                    Some(Reference::Choice(right))
                }
            }
        };
        questions.push(Question {
            id,
            key,
            image,
            text,
            llava_layout,
            choices,
            reference,
        });
    }
    if questions.is_empty() {
        return Err(format!("{}: no questions", path.display()).into());
    }
    Ok(questions)
}

/// A multiple-choice reference: an option letter ("B") or an option's text.
fn reference_option(answer: &str, choices: &[String]) -> Option<usize> {
    let answer = answer.trim();
    let mut letters = answer.chars();
    if let (Some(c @ 'A'..='Z'), None) = (letters.next(), letters.next()) {
        let i = (c as u8 - b'A') as usize;
        return (i < choices.len()).then_some(i);
    }
    choices
        .iter()
        .position(|c| normalize_vqa(c) == normalize_vqa(answer))
}

/// The option an answer picks: a leading option letter ("B", "B.", "(B) cat", "B: cat"), or
/// else an answer that is exactly one option's text (after [`normalize_vqa`]).
pub fn chosen_option(prediction: &str, choices: &[String]) -> Option<usize> {
    let text = prediction.trim();
    let text = text.strip_prefix('(').unwrap_or(text);
    let mut chars = text.chars();
    if let Some(c @ 'A'..='Z') = chars.next() {
        let i = (c as u8 - b'A') as usize;
        let next = chars.next();
        if i < choices.len() && next.is_none_or(|n| !n.is_alphanumeric()) {
            return Some(i);
        }
    }
    let predicted = normalize_vqa(prediction);
    choices.iter().position(|c| normalize_vqa(c) == predicted)
}

const PUNCTUATION: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];
const NUMBER_WORDS: [(&str, &str); 12] = [
    ("none", "0"),
    ("zero", "0"),
    ("one", "1"),
    ("two", "2"),
    ("three", "3"),
    ("four", "4"),
    ("five", "5"),
    ("six", "6"),
    ("seven", "7"),
    ("eight", "8"),
    ("nine", "9"),
    ("ten", "10"),
];
const ARTICLES: [&str; 3] = ["a", "an", "the"];
/// vqaEval.py's contractions (its keys with capitals, which never match the lowercased words,
/// are left out; "somebody'd" -> "somebodyd" is its own quirk, kept).
const CONTRACTIONS: [(&str, &str); 116] = [
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// vqaEval.py's answer normalization: newlines and tabs to spaces, punctuation removed (glued
/// to a space, or anywhere once the text has a `digit,digit`) or else replaced by a space,
/// periods not followed by a digit removed; then lowercase words, number words as digits,
/// articles dropped, contractions given their apostrophe.
pub fn normalize_vqa(answer: &str) -> String {
    let text = answer.replace(['\n', '\t'], " ");
    let text = text.trim();
    let chars: Vec<char> = text.chars().collect();
    // Python's \d; `is_numeric` is its near superset (it also takes other numeric characters).
    let digit_comma_digit = chars
        .windows(3)
        .any(|w| w[0].is_numeric() && w[1] == ',' && w[2].is_numeric());
    let mut out = text.to_string();
    for p in PUNCTUATION {
        let glued = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(p, if glued || digit_comma_digit { "" } else { " " });
    }
    let chars: Vec<char> = out.chars().collect();
    let out: String = chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c != '.' || chars.get(i + 1).is_some_and(|n| n.is_numeric()))
        .map(|(_, &c)| c)
        .collect();
    let words: Vec<&str> = out.split_whitespace().collect();
    let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    lower
        .iter()
        .map(|w| {
            NUMBER_WORDS
                .iter()
                .find(|(word, _)| word == w)
                .map_or(w.as_str(), |(_, digit)| digit)
        })
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| {
            CONTRACTIONS
                .iter()
                .find(|(short, _)| *short == w)
                .map_or(w, |(_, full)| full)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The answers already in the output file, by question key. An interrupted run may have left a
/// last line without its newline: it is cut off, and that question asked again.
fn read_done(path: &Path) -> CliResult<HashMap<String, String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(format!("reading {}: {e}", path.display()).into()),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        let keep = text.rfind('\n').map_or(0, |i| i + 1);
        let file = std::fs::OpenOptions::new().write(true).open(path)?;
        file.set_len(keep as u64)
            .map_err(|e| format!("{}: cutting an incomplete last line: {e}", path.display()))?;
    }
    let mut done = HashMap::new();
    for (line, row) in json_lines(path)? {
        let at = format!("{} line {line}", path.display());
        let key = row
            .get("question_id")
            .and_then(id_key)
            .ok_or_else(|| format!("{at}: no \"question_id\""))?;
        let text = row
            .get("text")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{at}: no \"text\""))?;
        done.insert(key, text.to_string());
    }
    Ok(done)
}

pub fn eval(args: EvalArgs) -> CliResult<()> {
    for (name, template, needs) in [
        ("--template", args.template.as_deref(), &["{question}"][..]),
        (
            "--choice-template",
            Some(args.choice_template.as_str()),
            &["{question}", "{choices}"][..],
        ),
    ] {
        if let Some(missing) = template.and_then(|t| needs.iter().find(|n| !t.contains(**n))) {
            return Err(format!("{name} must contain {missing}").into());
        }
    }
    let questions = read_questions(&args)?;
    let mut done = read_done(&args.output)?;
    let todo: Vec<&Question> = questions
        .iter()
        .filter(|q| !done.contains_key(&q.key))
        .collect();
    let skipped = questions.len() - todo.len();
    let (mut new_tokens, mut decode_s) = (0usize, 0f64);
    if !todo.is_empty() {
        let (model, _) = load(&args.model)?;
        let mut output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.output)
            .map_err(|e| format!("opening {}: {e}", args.output.display()))?;
        let mut session = model.chat(args.system.clone())?;
        let params = args.sampling.params();
        let terminal = std::io::stderr().is_terminal();
        let (mut correct, mut scored) = (0.0, 0usize);
        for (i, question) in todo.iter().enumerate() {
            session.reset();
            let image = question.image.as_deref().map(read_image).transpose()?;
            let prompt = question.prompt(args.template.as_deref(), &args.choice_template);
            let turn = Turn {
                image: image.as_ref(),
                text: &prompt,
                raw_prompt: false,
                want_logits: false,
            };
            let reply = pollster::block_on(session.send(&model, turn, &params, |_| true))
                .map_err(|e| format!("question {}: {e}", question.key))?;
            new_tokens += reply.tokens.len();
            decode_s += reply.timings.decode_s;
            let score = question.score(&reply.text);
            if let Some(s) = score {
                (correct, scored) = (correct + s, scored + 1);
            }
            let chosen = (!question.choices.is_empty()).then(|| {
                chosen_option(&reply.text, &question.choices).map(|c| option_letter(c).to_string())
            });
            let mut row = json!({
                "question_id": question.id,
                "prompt": prompt,
                "text": reply.text,
                "tokens": reply.tokens.len(),
                "score": score,
                "image_cached": reply.timings.image_cached,
            });
            if let Some(chosen) = chosen {
                row["chosen"] = json!(chosen);
            }
            writeln!(output, "{row}")
                .and_then(|()| output.flush())
                .map_err(|e| format!("writing {}: {e}", args.output.display()))?;
            done.insert(question.key.clone(), reply.text);
            let accuracy = if scored > 0 {
                format!(", accuracy so far {:.1}%", 100.0 * correct / scored as f64)
            } else {
                String::new()
            };
            eprint!(
                "{}[{}/{}] {:.1} tokens/s{accuracy}{}",
                if terminal { "\r" } else { "" },
                i + 1,
                todo.len(),
                new_tokens as f64 / decode_s.max(1e-9),
                if terminal { "\x1b[K" } else { "\n" }
            );
        }
        if terminal {
            eprintln!();
        }
        if args.model.profile {
            print_kernel_times("every answer", model.gpu().take_profile());
        }
    }

    let scores: Vec<f64> = questions
        .iter()
        .filter_map(|q| q.score(&done[&q.key]))
        .collect();
    let correct: f64 = scores.iter().sum();
    let accuracy = if scores.is_empty() {
        None
    } else {
        Some(correct / scores.len() as f64)
    };
    let tokens_per_s = (new_tokens > 0).then(|| new_tokens as f64 / decode_s.max(1e-9));
    if args.json {
        let summary = json!({
            "questions": questions.len(),
            "answered": todo.len(),
            "skipped": skipped,
            "scored": scores.len(),
            "correct": correct,
            "accuracy": accuracy,
            "tokens_per_s": tokens_per_s,
        });
        println!("{summary}");
    } else {
        match accuracy {
            Some(a) => print!("accuracy {correct}/{} = {:.2}%", scores.len(), 100.0 * a),
            None => print!("no reference answers: nothing scored"),
        }
        print!(
            " ({} questions: {} answered now, {skipped} already in {}",
            questions.len(),
            todo.len(),
            args.output.display()
        );
        match tokens_per_s {
            Some(t) => println!("; {t:.1} tokens/s)"),
            None => println!(")"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases worked by hand through vqaEval.py's processPunctuation and processDigitArticle.
    #[test]
    fn vqa_normalization_follows_the_official_script() {
        let cases = [
            ("Two", "2"),
            ("The red one.", "red 1"),
            ("  a dog\n", "dog"),
            // "?" glued to a space nowhere -> replaced by a space, then split away.
            ("yes?", "yes"),
            // "-" not next to a space -> a space: two words.
            ("t-shirt", "t shirt"),
            // " -" appears -> every "-" removed.
            ("t-shirt -", "tshirt"),
            // A digit,digit anywhere -> punctuation removed, not spaced.
            ("1,000 people!", "1000 people"),
            // Periods before a digit stay; others go.
            ("3.5 m.", "3.5 m"),
            ("dont know", "don't know"),
            ("None", "0"),
            ("An apple; a pear", "apple pear"),
            ("It's TEN o'clock", "it's 10 o'clock"),
            ("红色", "红色"),
        ];
        for (answer, want) in cases {
            assert_eq!(normalize_vqa(answer), want, "{answer:?}");
        }
    }

    #[test]
    fn options_are_read_from_a_letter_or_the_option_text() {
        let choices: Vec<String> = ["a cat", "a dog", "Zebra"].map(String::from).to_vec();
        assert_eq!(chosen_option("B", &choices), Some(1));
        assert_eq!(chosen_option(" (C) zebra", &choices), Some(2));
        assert_eq!(chosen_option("A. a cat", &choices), Some(0));
        assert_eq!(chosen_option("the dog", &choices), Some(1));
        // "D" is past the options; "Bird" starts with a letter but is a word.
        assert_eq!(chosen_option("D", &choices), None);
        assert_eq!(chosen_option("Bird", &choices), None);
        assert_eq!(reference_option("C", &choices), Some(2));
        assert_eq!(reference_option("a dog", &choices), Some(1));
        assert_eq!(reference_option("E", &choices), None);
    }
}
