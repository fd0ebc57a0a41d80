// Zero-shot classification with a trained checkpoint: embed test images, embed the class prompts, predict the
// class whose vector is closest.   usage: example_zero_shot runs/demo/checkpoint.safetensors [N]
#include <cstdio>
#include <cstdlib>
#include <limoe/data/data.hpp>
#include <limoe/eval/evaluate.hpp>
#include <limoe/model/checkpoint.hpp>
#include <numeric>

int main(int argc, char** argv) try {
  if (argc < 2) return std::fprintf(stderr, "usage: %s CHECKPOINT [N]\n", argv[0]), 2;
  const auto ckpt = limoe::io::SafetensorsReader::open(argv[1]);
  limoe::Limoe<float> model(limoe::read_checkpoint_config(ckpt));    // the config travels in the checkpoint
  limoe::load_weights(model, ckpt);
  const auto tok = limoe::data::WordTokenizer::from_json(ckpt.metadata().at("tokenizer"));

  const auto test = limoe::data::open_dataset({}, limoe::data::Split::test);   // Fashion-MNIST or synthetic
  std::vector<limoe::index_t> idx(argc > 2 ? std::atoi(argv[2]) : 1000);
  std::iota(idx.begin(), idx.end(), 0);
  const auto images = limoe::embed_images(model, test, idx);          // [n, P], L2-normalised
  const auto classes = limoe::class_embeddings(model, tok, test);     // [C, P] averaged over prompt templates

  std::vector<int> labels;
  for (auto i : idx) labels.push_back(test.get(i, limoe::Rng(0)).label);
  std::printf("zero-shot top-1 on %zu %s images: %.3f\n", idx.size(), test.name().c_str(),
              limoe::zero_shot_accuracy(images, labels, classes));
} catch (const std::exception& e) {
  std::fprintf(stderr, "error: %s\n", e.what());
  return 1;
}
