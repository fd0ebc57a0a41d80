// limoe/data/captions.hpp: captions from templates x class names with synonyms, and zero-shot prompts.
//
// A template holds one "{}" where a class name goes. Training captions pick a training template and a synonym of
// the class at random (counter-based, reproducible). Zero-shot evaluation (spec section 5) uses a DISJOINT set of
// evaluation templates, CLIP style, filled with the canonical class name, so the prompts are sentences the model
// never saw during training.
#pragma once

#include <cctype>
#include <string>
#include <string_view>
#include <vector>

#include "limoe/core/error.hpp"
#include "limoe/core/rng.hpp"
#include "limoe/data/dataset.hpp"

namespace limoe::data {

// Puts `name` where "{}" is. A template's article "a {}" becomes "an {}" before a vowel ("an ankle boot").
inline std::string fill_template(std::string_view tmpl, std::string_view name) {
  const auto at = tmpl.find("{}");
  LIMOE_CHECK(at != std::string_view::npos, "caption template \"", tmpl, "\" has no \"{}\" placeholder");
  std::string head(tmpl.substr(0, at));
  const bool vowel = !name.empty() && std::string_view("aeiouAEIOU").find(name.front()) != std::string_view::npos;
  if (vowel && (head == "a " || (head.size() >= 3 && head.compare(head.size() - 3, 3, " a ") == 0)))
    head.insert(head.size() - 1, "n");
  return head + std::string(name) + std::string(tmpl.substr(at + 2));
}

// Class names, their synonyms and the two template sets of a labelled data set.
struct CaptionSet {
  std::vector<std::string> class_names;            // canonical names, used in the zero-shot prompts
  std::vector<std::vector<std::string>> synonyms;  // per class; the canonical name is one of them
  std::vector<std::string> train_templates;        // "{}" placeholder
  std::vector<std::string> eval_templates;         // disjoint from train_templates

  int num_classes() const { return static_cast<int>(class_names.size()); }

  // A caption for class `label`: template and synonym drawn from counters (stream, 0) and (stream, 1) of rng.
  // Evaluation captions use the canonical name.
  std::string caption(int label, const Rng& rng, std::uint64_t stream, Templates which = Templates::train) const {
    check_class(label);
    if (which == Templates::eval) {
      const auto t = detail::uniform_int(rng, stream, 0, eval_templates.size());
      return fill_template(eval_templates[t], class_names[static_cast<std::size_t>(label)]);
    }
    const auto& syn = synonyms[static_cast<std::size_t>(label)];
    const auto t = detail::uniform_int(rng, stream, 0, train_templates.size());
    const auto s = detail::uniform_int(rng, stream, 1, syn.size());
    return fill_template(train_templates[t], syn[s]);
  }

  // The evaluation templates filled with the canonical name of class c (zero-shot classification).
  std::vector<std::string> class_prompts(int c) const {
    check_class(c);
    std::vector<std::string> out;
    for (const auto& t : eval_templates) out.push_back(fill_template(t, class_names[static_cast<std::size_t>(c)]));
    return out;
  }

  // Every training template with every synonym, and every evaluation prompt: all words captions can use.
  std::vector<std::string> corpus() const {
    std::vector<std::string> out;
    for (const auto& syn : synonyms)
      for (const auto& s : syn)
        for (const auto& t : train_templates) out.push_back(fill_template(t, s));
    for (int c = 0; c < num_classes(); ++c)
      for (auto& p : class_prompts(c)) out.push_back(std::move(p));
    return out;
  }

  void check_class(int c) const {
    LIMOE_CHECK(c >= 0 && c < num_classes(), "class id ", c, " out of range 0..", num_classes() - 1);
  }
};

// CLIP-style templates for photographs of single objects. The evaluation set follows CLIP's ImageNet prompts;
// the training set is other phrasings.
inline std::vector<std::string> object_eval_templates() {
  return {"a photo of a {}.",          "a black and white photo of a {}.", "a low resolution photo of a {}.",
          "a blurry photo of a {}.",   "a pixelated photo of the {}.",     "a photo of the small {}.",
          "a grayscale image of a {}.", "itap of a {}."};
}
inline std::vector<std::string> object_train_templates() {
  return {"a picture of a {}",          "an image of a {}",            "a {} on a plain background",
          "a product photo of a {}",    "a {}",                        "this is a {}",
          "a close-up of a {}",         "a catalogue photo of a {}",   "a {} for sale",
          "a small image of a {}",      "a dark photo of a {}",        "a bright photo of a {}",
          "a centred photo of a {}",    "a {} seen from the front",    "a thumbnail of a {}",
          "a scan of a {}",             "a clean photo of a {}",       "a cropped photo of a {}",
          "a {} in an online shop",     "a studio photo of a {}",      "a simple picture of a {}",
          "a good photo of a {}",       "there is a {} in the picture", "a shot of a single {}"};
}

// Fashion-MNIST's ten classes (label order of the data set) with synonyms.
inline const CaptionSet& fashion_mnist_captions() {
  static const CaptionSet set = [] {
    CaptionSet s;
    s.class_names = {"t-shirt", "trouser", "pullover", "dress", "coat",
                     "sandal",  "shirt",   "sneaker",  "bag",   "ankle boot"};
    s.synonyms = {
        {"t-shirt", "tee", "top", "tee shirt"},
        {"trouser", "pair of trousers", "pair of pants", "pair of jeans"},
        {"pullover", "sweater", "jumper"},
        {"dress", "gown", "frock"},
        {"coat", "jacket", "winter coat"},
        {"sandal", "summer sandal", "flip flop"},
        {"shirt", "button-up shirt", "blouse"},
        {"sneaker", "trainer", "running shoe", "sports shoe"},
        {"bag", "handbag", "purse", "tote bag"},
        {"ankle boot", "boot", "short boot"},
    };
    s.train_templates = object_train_templates();
    s.eval_templates = object_eval_templates();
    return s;
  }();
  return set;
}

}  // namespace limoe::data
