#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llava_model::fuzzing::tokenizer_json(data));
