//! Chat templates are found the same way wherever a checkpoint keeps them: a copy of mistral-tiny
//! whose template lives only in `tokenizer_config.json` (as a string, or in the list of named
//! templates) or only in `chat_template.json` gives the prompt ids and greedy tokens of the
//! fixture's `chat_template.jinja`. The loading sequence asks a source that can list its folder
//! for no file the folder lacks (on the web, a request that would answer 404), and checks a
//! shard index against the shards it streamed.

mod common;

use std::cell::RefCell;
use std::path::Path;

use common::{fixture, gpu, greedy16};
use llava_model::files::source::{DirSource, LayoutHint, ModelSource};
use llava_model::generate::Turn;
use llava_model::llava::{Llava, LoadOptions, ModelFiles};
use llava_model::{Message, Result};
use serde_json::{Value, json};

const SYSTEM: &str = "Answer in one word.";
const QUESTION: &str = "What is the capital of France?";

/// mistral-tiny copied into a temporary folder, without its `chat_template.jinja`; `edit` then
/// places the template.
fn without_jinja(edit: impl FnOnce(&Path, &str)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("mistral-tiny")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let jinja = std::fs::read_to_string(dir.path().join("chat_template.jinja")).unwrap();
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    edit(dir.path(), &jinja);
    dir
}

fn set_tokenizer_config_key(dir: &Path, value: Value) {
    let path = dir.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["chat_template"] = value;
    std::fs::write(&path, config.to_string()).unwrap();
}

/// The prompt ids of a first turn with a system prompt, and its greedy tokens.
fn ids_and_tokens(dir: &Path) -> (Vec<u32>, Vec<u32>) {
    let llava = Llava::load_dir(gpu(), dir, &LoadOptions::default()).unwrap();
    let prompt = llava
        .render_chat(Some(SYSTEM), &[Message::user(0, QUESTION)])
        .unwrap();
    // The fixture's template writes the system prompt (the built-in Mistral one refuses it).
    assert!(prompt.contains("<<SYS>>"), "{prompt}");
    let (ids, _) = llava.tokenize_prompt(&prompt, None).unwrap();
    let mut chat = llava.chat(Some(SYSTEM.into())).unwrap();
    let turn = Turn {
        image: None,
        text: QUESTION,
        raw_prompt: false,
        want_logits: false,
    };
    let reply = pollster::block_on(chat.send(&llava, turn, &greedy16(), |_| true)).unwrap();
    assert_eq!(reply.prompt_tokens, ids.len());
    (ids, reply.tokens)
}

#[test]
fn a_template_in_tokenizer_config_or_chat_template_json_answers_like_the_jinja_file() {
    let reference = ids_and_tokens(&fixture("mistral-tiny"));
    assert_eq!(reference.1.len(), 16);
    let variants = [
        (
            "tokenizer_config.json string",
            without_jinja(|dir, jinja| set_tokenizer_config_key(dir, json!(jinja))),
        ),
        (
            "tokenizer_config.json named list",
            without_jinja(|dir, jinja| {
                let named = json!([{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                                   {"name": "default", "template": jinja}]);
                set_tokenizer_config_key(dir, named)
            }),
        ),
        (
            "chat_template.json",
            without_jinja(|dir, jinja| {
                std::fs::write(
                    dir.join("chat_template.json"),
                    json!({"chat_template": jinja}).to_string(),
                )
                .unwrap()
            }),
        ),
    ];
    for (name, dir) in &variants {
        assert_eq!(ids_and_tokens(dir.path()), reference, "{name}");
    }
}

#[test]
fn the_template_sees_the_special_tokens_of_tokenizer_config() {
    let dir = without_jinja(|dir, _| {
        let template = "{{ bos_token }}|{{ eos_token }}|{{ messages[0]['content'][0]['text'] }}";
        std::fs::write(
            dir.join("chat_template.json"),
            json!({"chat_template": template}).to_string(),
        )
        .unwrap();
        // transformers writes special tokens as strings or as AddedToken objects.
        let path = dir.join("tokenizer_config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["bos_token"] = json!("<s>");
        config["eos_token"] =
            json!({"content": "</s>", "lstrip": false, "normalized": false, "special": true});
        std::fs::write(&path, config.to_string()).unwrap();
    });
    let files = ModelFiles::from_dir(dir.path()).unwrap();
    assert_eq!(
        files
            .template
            .render(&[Message::user(0, "hi")], true)
            .unwrap(),
        "<s>|</s>|hi"
    );

    // A chat_template.json without the key is named as such.
    std::fs::write(dir.path().join("chat_template.json"), "{}").unwrap();
    let msg = ModelFiles::from_dir(dir.path())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("chat_template.json: key `chat_template` is missing"),
        "{msg}"
    );
}

/// A folder source that records every file asked for and whether the folder had it; `listing`
/// false makes it answer like a web source without the folder's file list.
struct Recording {
    dir: DirSource,
    listing: bool,
    asked: RefCell<Vec<(String, bool)>>,
}

impl Recording {
    fn note(&self, file: &str) {
        let found = self.dir.has(file) == Some(true);
        self.asked.borrow_mut().push((file.to_string(), found));
    }
}

impl ModelSource for Recording {
    type Shard = <DirSource as ModelSource>::Shard;
    fn locate(&self, file: &str) -> String {
        self.dir.locate(file)
    }
    fn location(&self) -> String {
        self.dir.location()
    }
    fn has(&self, file: &str) -> Option<bool> {
        if self.listing {
            self.dir.has(file)
        } else {
            None
        }
    }
    fn list(&self) -> Option<Vec<String>> {
        if self.listing { self.dir.list() } else { None }
    }
    fn size(&self, file: &str) -> Option<u64> {
        self.dir.size(file)
    }
    async fn read(&self, file: &str, optional: bool) -> Result<Option<Vec<u8>>> {
        self.note(file);
        self.dir.read(file, optional).await
    }
    async fn open_shard(&self, file: &str) -> Result<Self::Shard> {
        self.note(file);
        self.dir.open_shard(file).await
    }
}

fn load_recording(dir: &Path, listing: bool) -> Vec<(String, bool)> {
    let source = Recording {
        dir: DirSource::new(dir),
        listing,
        asked: RefCell::new(Vec::new()),
    };
    pollster::block_on(Llava::load(
        gpu(),
        &source,
        LayoutHint::Probe,
        &LoadOptions::default(),
        &mut |_| {},
    ))
    .unwrap();
    source.asked.into_inner()
}

#[test]
fn a_source_that_lists_its_folder_is_asked_for_no_missing_file() {
    let with_json = without_jinja(|dir, jinja| {
        std::fs::write(
            dir.join("chat_template.json"),
            json!({"chat_template": jinja}).to_string(),
        )
        .unwrap()
    });
    let in_config = without_jinja(|dir, jinja| set_tokenizer_config_key(dir, json!(jinja)));
    let mut folders: Vec<_> = [
        "bf16-tiny",
        "chatml-tiny",
        "liuhaotian-tiny",
        "mistral-tiny",
        "odd-heads-tiny",
        "tied-f32",
        "vicuna-tiny",
    ]
    .map(fixture)
    .into_iter()
    .collect();
    folders.extend([
        with_json.path().to_path_buf(),
        in_config.path().to_path_buf(),
    ]);
    for dir in &folders {
        let asked = load_recording(dir, true);
        let missing: Vec<_> = asked.iter().filter(|(_, found)| !found).collect();
        assert!(
            missing.is_empty(),
            "{}: asked for {missing:?}",
            dir.display()
        );
        assert!(asked.iter().any(|(f, _)| f == "config.json"), "{asked:?}");
    }
    // Without a listing the same rules probe: mistral-tiny's template-in-config copy is asked
    // for both template files, in order, before its tokenizer_config.json key is used.
    let asked = load_recording(in_config.path(), false);
    let probed: Vec<&str> = asked
        .iter()
        .filter(|(_, found)| !found)
        .map(|(f, _)| f.as_str())
        .collect();
    assert_eq!(probed, ["chat_template.jinja", "chat_template.json"]);
}

#[test]
fn an_index_that_misplaces_a_tensor_is_named() {
    let dir =
        without_jinja(|dir, jinja| std::fs::write(dir.join("chat_template.jinja"), jinja).unwrap());
    let path = dir.path().join("model.safetensors.index.json");
    let mut index: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    let (name, shard) = map
        .iter()
        .map(|(n, s)| (n.clone(), s.as_str().unwrap().to_string()))
        .next()
        .unwrap();
    let other = map
        .values()
        .map(|s| s.as_str().unwrap().to_string())
        .find(|s| *s != shard)
        .unwrap();
    map.insert(name.clone(), json!(other));
    std::fs::write(&path, index.to_string()).unwrap();
    let msg = Llava::load_dir(gpu(), dir.path(), &LoadOptions::default())
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model.safetensors.index.json")
            && msg.contains(&format!("lists `{name}` in"))
            && msg.contains(&other),
        "{msg}"
    );
}
