#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nomoat_fuzz::chat_template::run(data);
});
