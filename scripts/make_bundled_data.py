#!/usr/bin/env python
"""Generate the datasets bundled with tunelab (``src/tunelab/resources``).

Writes three files, all original text written for tunelab (Apache-2.0):

* ``demo_sft.jsonl``      -- ~800 chat records for ``tunelab demo`` (mostly a live-stream
                             shopping assistant that answers with tool-call JSON).
* ``demo_corpus.txt``     -- plain text used to train the demo's tiny BPE tokenizer.
* ``general_probe.jsonl`` -- 300 short, exactly checkable questions used as a
                             "forgetting" probe of general ability.

The output depends only on ``SEED``: every random choice goes through ``random.Random``
instances seeded with integers, nothing iterates over a ``set`` and nothing reads the
clock, so running the script twice produces byte-identical files.

Usage::

    python scripts/make_bundled_data.py            # write into src/tunelab/resources
    python scripts/make_bundled_data.py --out DIR  # write somewhere else
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import random
from fractions import Fraction
from pathlib import Path

SEED = 20240611

RESOURCES_DIR = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "resources"

DEMO_SFT = "demo_sft.jsonl"
DEMO_CORPUS = "demo_corpus.txt"
GENERAL_PROBE = "general_probe.jsonl"

# ----------------------------------------------------------------------------------------------
# Live-stream shopping assistant (tool calls)
# ----------------------------------------------------------------------------------------------

TOOL_SYSTEM_PROMPT = "你是直播间购物助手。把观众的请求转成工具调用 JSON。"

INTENTS = ("add_to_cart", "check_stock", "query_price", "apply_coupon", "track_order", "ask_shipping")

# (zh, en singular, en plural) -- all garments sold in sizes S/M/L/XL.
PRODUCTS = (
    ("卫衣", "hoodie", "hoodies"),
    ("T恤", "T-shirt", "T-shirts"),
    ("夹克", "jacket", "jackets"),
    ("连衣裙", "dress", "dresses"),
    ("衬衫", "shirt", "shirts"),
    ("毛衣", "sweater", "sweaters"),
    ("外套", "coat", "coats"),
    ("半身裙", "skirt", "skirts"),
    ("羽绒服", "down jacket", "down jackets"),
    ("背心", "vest", "vests"),
    ("风衣", "trench coat", "trench coats"),
    ("西装", "suit", "suits"),
    ("雨衣", "raincoat", "raincoats"),
    ("开衫", "cardigan", "cardigans"),
    ("Polo衫", "polo shirt", "polo shirts"),
)

COLORS = (
    ("红色", "red"),
    ("黑色", "black"),
    ("白色", "white"),
    ("蓝色", "blue"),
    ("绿色", "green"),
    ("灰色", "grey"),
    ("粉色", "pink"),
    ("黄色", "yellow"),
)

SIZES = ("S", "M", "L", "XL")

CITIES = (
    ("北京", "Beijing"),
    ("上海", "Shanghai"),
    ("广州", "Guangzhou"),
    ("深圳", "Shenzhen"),
    ("杭州", "Hangzhou"),
    ("成都", "Chengdu"),
    ("武汉", "Wuhan"),
    ("南京", "Nanjing"),
    ("西安", "Xi'an"),
    ("重庆", "Chongqing"),
    ("天津", "Tianjin"),
    ("苏州", "Suzhou"),
)

COUPON_CODES = ("SAVE10", "SAVE20", "SAVE30", "NEW50", "VIP15", "FLASH5", "LIVE88", "WELCOME8")

# Quantities are always written as integers in the JSON; the request may spell them out.
ZH_QTY_WORDS = {1: "一", 2: "两", 3: "三", 4: "四", 5: "五"}
EN_QTY_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

ZH_PREFIXES = ("", "", "", "主播，", "你好，", "哈喽，")
EN_PREFIXES = ("", "", "", "Hi, ", "Hey, ", "Hello, ")

ZH_TEMPLATES = {
    "add_to_cart": (
        "帮我把{color}的{product}加入购物车，要{size}码，{qty}件",
        "{color}{product}来{qty}件，{size}码，加购物车",
        "我要{qty}件{color}的{product}，{size}码的，帮我加到购物车",
        "把{size}码的{color}{product}加购{qty}件",
        "{color}的{product}给我加{qty}件到购物车，尺码{size}",
        "加购：{product}，{color}，{size}码，{qty}件",
    ),
    "check_stock": (
        "{desc}还有货吗？",
        "请问{desc}有库存吗",
        "{desc}还有吗？想要",
        "查一下{desc}的库存",
        "{desc}卖完了吗？",
    ),
    "query_price": (
        "{product}多少钱？",
        "这件{product}什么价格",
        "{product}现在卖多少钱",
        "请问{product}的价格是多少",
        "{product}怎么卖？",
    ),
    "apply_coupon": (
        "我有优惠券{code}，帮我用上",
        "用一下优惠码{code}",
        "优惠码{code}能用吗？帮我使用",
        "下单时使用优惠券{code}",
        "帮我把{code}这个券用了",
    ),
    "track_order": (
        "我的订单{order_id}到哪了？",
        "查一下订单{order_id}的物流",
        "订单号{order_id}，什么时候到",
        "帮我看看{order_id}这个订单发货了吗",
        "订单{order_id}的快递到哪里了",
    ),
    "ask_shipping": (
        "发货到{city}要几天？",
        "{city}包邮吗？",
        "寄到{city}运费多少",
        "我在{city}，多久能收到",
        "能发{city}吗？",
    ),
}

EN_TEMPLATES = {
    "add_to_cart": (
        "Add {qty} {color} {products} in size {size} to my cart",
        "Put {qty} {color} {products}, size {size}, in my cart please",
        "I'd like {qty} {products} in {color}, size {size}. Add to cart.",
        "Cart: {qty} x {color} {product}, size {size}",
        "Can you add {qty} size {size} {color} {products} to the cart?",
    ),
    "check_stock": (
        "Is the {desc} still in stock?",
        "Do you have the {desc} in stock?",
        "Any {desc} left in stock?",
        "Check stock for the {desc}",
        "Is the {desc} sold out?",
    ),
    "query_price": (
        "How much is the {product}?",
        "What's the price of the {product}?",
        "Price of the {product} please",
        "How much does the {product} cost?",
        "Tell me the {product} price",
    ),
    "apply_coupon": (
        "Apply coupon {code} please",
        "I have a coupon code {code}, use it",
        "Use promo code {code} on my order",
        "Can I use the code {code}?",
        "Please apply {code} to my order",
    ),
    "track_order": (
        "Where is my order {order_id}?",
        "Track order {order_id} please",
        "Has order {order_id} shipped yet?",
        "Check the status of order {order_id}",
        "My order number is {order_id}, where is it?",
    ),
    "ask_shipping": (
        "How long does shipping to {city} take?",
        "Do you ship to {city}?",
        "What's the shipping cost to {city}?",
        "I live in {city}, when will it arrive?",
        "Is shipping to {city} free?",
    ),
}


def tool_json(intent: str, params: dict) -> str:
    """The canonical assistant answer: compact JSON with sorted keys."""
    return json.dumps({"intent": intent, "params": params}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _with_prefix(prefix: str, body: str) -> str:
    if prefix.endswith(", ") and not body.startswith(("I ", "I'")):
        body = body[0].lower() + body[1:]
    return prefix + body


def _order_id(rng: random.Random) -> str:
    return str(rng.randint(100000, 999999))


def make_tool_request(rng: random.Random, intent: str, lang: str) -> tuple[str, dict]:
    """Return (user request, params) for one tool-call record."""
    zh = lang == "zh"
    prod = rng.choice(PRODUCTS)
    color = rng.choice(COLORS)
    size = rng.choice(SIZES)
    templates = ZH_TEMPLATES[intent] if zh else EN_TEMPLATES[intent]
    template = rng.choice(templates)
    fields: dict[str, str] = {}
    if intent == "add_to_cart":
        qty = rng.randint(1, 5)
        params = {"product": prod[0] if zh else prod[1], "color": color[0] if zh else color[1], "size": size,
                  "quantity": qty}
        if zh:
            fields = {"product": prod[0], "color": color[0], "size": size,
                      "qty": ZH_QTY_WORDS[qty] if rng.random() < 0.6 else str(qty)}
        else:
            fields = {"product": prod[1], "products": prod[1] if qty == 1 else prod[2], "color": color[1],
                      "size": size, "qty": EN_QTY_WORDS[qty] if rng.random() < 0.6 else str(qty)}
    elif intent == "check_stock":
        shape = rng.choice(("p", "pc", "ps", "pcs"))
        params = {"product": prod[0] if zh else prod[1]}
        if "c" in shape:
            params["color"] = color[0] if zh else color[1]
        if "s" in shape:
            params["size"] = size
        if zh:
            desc = {"p": "{p}", "pc": "{c}的{p}", "ps": "{s}码的{p}", "pcs": "{c}{p}{s}码"}[shape]
            fields = {"desc": desc.format(p=prod[0], c=color[0], s=size)}
        else:
            desc = {"p": "{p}", "pc": "{c} {p}", "ps": "{p} in size {s}", "pcs": "{c} {p} in size {s}"}[shape]
            fields = {"desc": desc.format(p=prod[1], c=color[1], s=size)}
    elif intent == "query_price":
        params = {"product": prod[0] if zh else prod[1]}
        fields = {"product": params["product"]}
    elif intent == "apply_coupon":
        params = {"code": rng.choice(COUPON_CODES)}
        fields = dict(params)
    elif intent == "track_order":
        params = {"order_id": _order_id(rng)}
        fields = dict(params)
    elif intent == "ask_shipping":
        city = rng.choice(CITIES)
        params = {"city": city[0] if zh else city[1]}
        fields = dict(params)
    else:  # pragma: no cover - guarded by INTENTS
        raise ValueError(intent)
    body = template.format(**fields)
    prefix = rng.choice(ZH_PREFIXES if zh else EN_PREFIXES)
    return _with_prefix(prefix, body), params


# ----------------------------------------------------------------------------------------------
# Other short instruction tasks in the demo set (no system prompt)
# ----------------------------------------------------------------------------------------------

SENTIMENT_LABELS = ("positive", "negative")

ZH_REVIEW_BITS = {
    "positive": ("质量很好，穿着很舒服", "颜色很正，和图片一样", "物流很快，包装也很好", "性价比很高，还会回购",
                 "尺码合适，版型好看", "面料柔软，非常满意", "做工精细，推荐购买"),
    "negative": ("质量太差了，穿一次就起球", "颜色和图片差很多", "发货太慢，等了十天", "尺码偏小，根本穿不上",
                 "线头很多，做工粗糙", "一洗就掉色，很失望", "面料很薄，不值这个价"),
}
EN_REVIEW_BITS = {
    "positive": ("fits perfectly and feels soft", "great quality for the price", "looks exactly like the photo",
                 "arrived fast and well packed", "lovely colour, I will buy again",
                 "very comfortable, highly recommend", "well made, no loose threads"),
    "negative": ("fell apart after one wash", "the colour looks nothing like the photo", "took two weeks to arrive",
                 "runs small and does not fit", "cheap fabric, very disappointed", "loose threads everywhere",
                 "too thin and not worth the price"),
}

CATEGORY_LABELS = ("clothing", "shoes", "electronics", "beauty", "food", "home")
CATEGORY_ITEMS = {
    "clothing": (("卫衣", "hoodie"), ("牛仔裤", "jeans"), ("连衣裙", "dress"), ("衬衫", "shirt"),
                 ("羽绒服", "down jacket"), ("袜子", "socks")),
    "shoes": (("运动鞋", "running shoes"), ("高跟鞋", "high heels"), ("拖鞋", "slippers"), ("靴子", "boots"),
              ("帆布鞋", "canvas shoes"), ("凉鞋", "sandals")),
    "electronics": (("蓝牙耳机", "bluetooth earbuds"), ("充电宝", "power bank"), ("平板电脑", "tablet"),
                    ("智能手表", "smartwatch"), ("机械键盘", "mechanical keyboard"), ("无线鼠标", "wireless mouse")),
    "beauty": (("口红", "lipstick"), ("面霜", "face cream"), ("防晒霜", "sunscreen"), ("粉底液", "foundation"),
               ("眼影盘", "eyeshadow palette"), ("洗面奶", "facial cleanser")),
    "food": (("坚果礼盒", "mixed nuts gift box"), ("牛肉干", "beef jerky"), ("巧克力", "chocolate"),
             ("绿茶", "green tea"), ("蜂蜜", "honey"), ("燕麦片", "rolled oats")),
    "home": (("抱枕", "throw pillow"), ("床上四件套", "bedding set"), ("收纳盒", "storage box"),
             ("香薰蜡烛", "scented candle"), ("毛巾", "bath towel"), ("拖把", "mop")),
}
ZH_ITEM_TAGS = ("", "【直播特价】", "【新品】", "【限时秒杀】")
EN_ITEM_TAGS = ("", "[Live deal] ", "[New] ", "[Flash sale] ")

ZH_ORDER_SENTENCES = (
    "您好，我的订单{id}还没发货，麻烦帮我看一下。",
    "订单{id}收到的颜色不对，想换货。",
    "昨天下的单，单号是{id}，什么时候能到？",
    "麻烦查一下{id}这个订单，物流一直没更新。",
    "我在直播间买的衣服，订单编号{id}，尺码拍错了。",
)
ZH_COUPON_SENTENCES = (
    "主播说今晚用{code}可以再减一点，我想试试。",
    "优惠码{code}提示已过期，怎么办？",
    "朋友给了我一个券码{code}，能叠加吗？",
)
EN_ORDER_SENTENCES = (
    "Hi, my order {id} still hasn't shipped.",
    "Order {id} arrived in the wrong colour, I want to swap it.",
    "I ordered yesterday, number {id}. When will it arrive?",
    "Please check order {id}, the tracking has not moved.",
    "I bought a shirt in the live stream, order {id}, wrong size.",
)
EN_COUPON_SENTENCES = (
    "The host said {code} gives an extra discount tonight.",
    "My code {code} says it has expired, what now?",
    "A friend gave me the code {code}. Can I stack it?",
)


def _user(content: str) -> dict:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def make_sentiment(rng: random.Random, lang: str) -> tuple[str, str]:
    label = rng.choice(SENTIMENT_LABELS)
    if lang == "zh":
        prod = rng.choice(PRODUCTS)[0]
        a, b = rng.sample(ZH_REVIEW_BITS[label], 2)
        review = f"这件{prod}{a}" if rng.random() < 0.5 else f"这件{prod}{a}，{b}"
        return f"判断评论的情感，只回答 positive 或 negative：{review}", label
    prod = rng.choice(PRODUCTS)[1]
    a, b = rng.sample(EN_REVIEW_BITS[label], 2)
    review = f"The {prod} {a}." if rng.random() < 0.5 else f"This {prod}: {a}, {b}."
    return f"Classify the sentiment as positive or negative: {review}", label


def make_category(rng: random.Random, lang: str) -> tuple[str, str]:
    label = rng.choice(CATEGORY_LABELS)
    zh_item, en_item = rng.choice(CATEGORY_ITEMS[label])
    options = "/".join(CATEGORY_LABELS)
    if lang == "zh":
        return f"商品分类（{options}），只回答类别：{rng.choice(ZH_ITEM_TAGS)}{zh_item}", label
    tag = rng.choice(EN_ITEM_TAGS)
    return f"Classify the product ({options}). Answer with the category only: {tag}{en_item}", label


def make_shop_math(rng: random.Random, lang: str) -> tuple[str, str]:
    kind = rng.randrange(4)
    zh = lang == "zh"
    prod = rng.choice(PRODUCTS)[0 if zh else 1]
    if kind == 0:
        price, n = rng.randint(2, 30) * 5, rng.randint(2, 5)
        answer = price * n
        q = (f"单价{price}元，买{n}件一共多少元？只回答数字。" if zh
             else f"One {prod} costs {price} dollars. How much do {n} cost? Answer with a number only.")
    elif kind == 1:
        price = rng.randint(10, 60) * 5
        off = rng.choice((10, 20, 30, 50))
        answer = price - off
        q = (f"一件{prod}{price}元，满减{off}元，实付多少元？只回答数字。" if zh
             else f"A {prod} is {price} dollars with {off} dollars off. What is the final price? "
                  "Answer with a number only.")
    elif kind == 2:
        kg = rng.randint(2, 9)
        answer = kg * 1000
        q = (f"{kg}千克等于多少克？只回答数字。" if zh
             else f"How many grams are in {kg} kilograms? Answer with a number only.")
    else:
        price = rng.randint(5, 40) * 10
        if zh:
            zhe = rng.randint(5, 9)
            answer = price * zhe // 10
            q = f"{prod}原价{price}元，打{zhe}折后多少元？只回答数字。"
        else:
            pct = rng.choice((10, 20, 30, 40, 50))
            answer = price * (100 - pct) // 100
            q = f"A {prod} costs {price} dollars and is {pct}% off. What is the sale price? Answer with a number only."
    return q, str(answer)


def make_extraction(rng: random.Random, lang: str) -> tuple[str, str]:
    zh = lang == "zh"
    if rng.random() < 2 / 3:
        oid = _order_id(rng)
        sentence = rng.choice(ZH_ORDER_SENTENCES if zh else EN_ORDER_SENTENCES).format(id=oid)
        return (f"提取订单号：{sentence}" if zh else f"Extract the order ID: {sentence}"), oid
    code = rng.choice(COUPON_CODES)
    sentence = rng.choice(ZH_COUPON_SENTENCES if zh else EN_COUPON_SENTENCES).format(code=code)
    return (f"提取优惠码：{sentence}" if zh else f"Extract the coupon code: {sentence}"), code


OTHER_TASKS = (
    ("sentiment", make_sentiment),
    ("category", make_category),
    ("shop_math", make_shop_math),
    ("extraction", make_extraction),
)

N_TOOL_PER_INTENT = (94, 94, 93, 93, 93, 93)  # 560 tool-call records (70 %)
N_OTHER_PER_TASK = 60  # 4 tasks x 60 = 240 records (30 %)
TOOL_ZH_SHARE = 0.65


def build_demo_sft(seed: int = SEED) -> list[dict]:
    """All demo records, shuffled deterministically; every user message is unique."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []

    def unique(make) -> tuple[str, object]:
        for _ in range(1000):
            user, answer = make()
            if user not in seen:
                seen.add(user)
                return user, answer
        raise RuntimeError("could not draw a unique request")  # pragma: no cover

    for intent, n in zip(INTENTS, N_TOOL_PER_INTENT, strict=True):
        n_zh = round(n * TOOL_ZH_SHARE)
        for i in range(n):
            lang = "zh" if i < n_zh else "en"
            user, params = unique(lambda intent=intent, lang=lang: make_tool_request(rng, intent, lang))
            records.append({"messages": [{"role": "system", "content": TOOL_SYSTEM_PROMPT}, _user(user),
                                         _assistant(tool_json(intent, params))]})
    for _name, make in OTHER_TASKS:
        for i in range(N_OTHER_PER_TASK):
            lang = "zh" if i % 2 == 0 else "en"
            user, answer = unique(lambda make=make, lang=lang: make(rng, lang))
            records.append({"messages": [_user(user), _assistant(str(answer))]})
    rng.shuffle(records)
    return records


# ----------------------------------------------------------------------------------------------
# Tokenizer corpus
# ----------------------------------------------------------------------------------------------

ZH_SENTENCES = (
    "今天晚上八点直播间准时开播，新品会在第一个小时上架。",
    "这款卫衣采用纯棉面料，洗了很多次也不变形。",
    "下单后四十八小时内发货，偏远地区可能会慢一两天。",
    "如果尺码不合适，七天内可以免费退换。",
    "满两百元减三十元，优惠券可以在结算页面使用。",
    "冬天快到了，羽绒服和毛衣的销量明显上涨。",
    "我妈妈喜欢在早上去菜市场买新鲜的蔬菜。",
    "周末我们一家人去公园散步，天气特别好。",
    "这本书一共有十二章，我每天晚上读一章。",
    "地铁二号线在早高峰的时候人非常多。",
    "他把手机充满电以后，就出门去上班了。",
    "一斤苹果八块钱，买三斤一共二十四块钱。",
    "小店的老板每天六点起床，七点开门营业。",
    "请把收货地址、电话和姓名填写完整。",
    "快递员说包裹明天上午会送到小区门口。",
    "这件外套有黑色、灰色和蓝色三种颜色可选。",
    "图书馆的自习室晚上十点关门。",
    "她每天坚持跑步三公里，已经坚持了一年。",
    "商品详情页写着：面料成分为百分之百棉。",
    "今天的气温是二十五度，很适合出去走走。",
    "直播间的观众越来越多，主播不停地介绍新款。",
    "这个月的电费比上个月多了二十元。",
    "超市里的牛奶正在做活动，第二件半价。",
    "我们约好下午三点在咖啡店门口见面。",
    "学校旁边新开了一家面包店，味道很不错。",
    "请问这双鞋有三十八码的吗？",
    "他买了两张去上海的火车票，周五出发。",
    "价格已经是全网最低了，数量有限，先到先得。",
    "客服的工作时间是早上九点到晚上九点。",
    "下雨天记得带伞，路上注意安全。",
    "这台笔记本电脑很轻，适合经常出差的人。",
    "孩子们在操场上踢足球，玩得很开心。",
    "订单已经签收，如有问题请联系客服。",
    "春天到了，公园里的花都开了。",
    "一年有十二个月，一个星期有七天。",
    "我家离公司大约五公里，骑车二十分钟。",
    "这款保温杯能保温十二个小时。",
    "奶奶在阳台上种了西红柿和辣椒。",
    "晚饭后我们一起看了一部电影。",
    "新用户首单立减十元，老用户也有专属优惠。",
)

EN_SENTENCES = (
    "The live stream starts at eight tonight and new items go on sale in the first hour.",
    "This hoodie is made of pure cotton and keeps its shape after many washes.",
    "Orders ship within 48 hours; remote areas may take a day or two longer.",
    "If the size is wrong, you can return it for free within seven days.",
    "Spend 200 and save 30 with the coupon at checkout.",
    "Winter is coming, so coats and sweaters are selling fast.",
    "My mother likes to buy fresh vegetables at the market in the morning.",
    "We went for a walk in the park on Sunday and the weather was great.",
    "The book has twelve chapters and I read one every night.",
    "The train is very crowded during the morning rush hour.",
    "He charged his phone and then left for work.",
    "Apples cost 3 dollars a pound, so three pounds cost 9 dollars.",
    "The shop owner gets up at six and opens the door at seven.",
    "Please fill in your name, phone number and delivery address.",
    "The courier said the parcel will arrive tomorrow morning.",
    "This jacket comes in black, grey and blue.",
    "The library reading room closes at ten in the evening.",
    "She runs three kilometres every day and has done so for a year.",
    "The product page says the fabric is 100% cotton.",
    "It is 25 degrees today, a good day to go outside.",
    "More and more viewers joined the stream while the host showed new styles.",
    "Our electricity bill was 20 dollars higher this month.",
    "The supermarket has a deal on milk: the second carton is half price.",
    "We agreed to meet outside the coffee shop at three in the afternoon.",
    "A new bakery opened next to the school and the bread is very good.",
    "Do you have these shoes in size 38?",
    "He bought two train tickets to Shanghai and leaves on Friday.",
    "This is already the lowest price online, and stock is limited.",
    "Customer service is open from nine in the morning to nine at night.",
    "Take an umbrella when it rains and be careful on the road.",
    "This laptop is very light, which is good for people who travel often.",
    "The children played football on the field and had a lot of fun.",
    "The order has been delivered; contact support if anything is wrong.",
    "Spring is here and the flowers in the park are in bloom.",
    "There are twelve months in a year and seven days in a week.",
    "My home is about five kilometres from the office, twenty minutes by bike.",
    "This flask keeps drinks hot for twelve hours.",
    "Grandma grows tomatoes and peppers on the balcony.",
    "After dinner we watched a film together.",
    "New customers get 10 dollars off their first order.",
)

ZH_NAMES = ("小明", "小红", "李华", "王芳", "张伟", "刘洋", "陈静", "赵磊")
EN_NAMES = ("Anna", "Tom", "Lucy", "Jack", "Emma", "Leo", "Mia", "Sam", "Nina", "Ben")
# (zh, en, lowest, highest temperature in °C) so that weather and temperature agree.
WEATHER = (("晴", "sunny", 5, 35), ("多云", "cloudy", 5, 30), ("小雨", "rainy", 8, 28), ("阴", "overcast", 3, 25),
           ("大风", "windy", 0, 20), ("下雪", "snowy", -10, 0))

JSON_PUNCTUATION_LINES = (
    '{"intent":"","params":{}}',
    '{ } [ ] " : , 0 1 2 3 4 5 6 7 8 9 true false null',
    "， 。 ？ ！ ： ； 、 （ ） 【 】 “ ” ％ % + - × ÷ = . ? ! ' ( ) [ ] /",
)


def _corpus_extra_lines(rng: random.Random) -> list[str]:
    lines: list[str] = list(ZH_SENTENCES) + list(EN_SENTENCES)
    for _ in range(120):
        zp, ep, ep_plural = rng.choice(PRODUCTS)
        zc, ec = rng.choice(COLORS)
        zcity, ecity = rng.choice(CITIES)
        price = rng.randint(5, 60) * 10
        sale = price - rng.randint(1, 4) * 10
        n, m = rng.randint(2, 9), rng.randint(10, 99)
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        kind = rng.randrange(6)
        if kind == 0:
            lines.append(f"这件{zc}{zp}原价{price}元，直播间只要{sale}元。")
            lines.append(f"The {ec} {ep} was {price} dollars, now only {sale}.")
        elif kind == 1:
            zw, ew, low, high = rng.choice(WEATHER)
            temp = rng.randint(low, high)
            lines.append(f"{zcity}今天{zw}，气温{temp}度。")
            lines.append(f"It is {ew} in {ecity} today, about {temp} degrees.")
        elif kind == 2:
            lines.append(f"{rng.choice(ZH_NAMES)}在{zcity}买了{n}件{zp}，送给家人。")
            lines.append(f"{rng.choice(EN_NAMES)} ordered {n} {ep_plural} in {ecity} for the family.")
        elif kind == 3:
            lines.append(f"{a}加{b}等于{a + b}，{a}乘以{n}等于{a * n}。")
            lines.append(f"{a} plus {b} equals {a + b}, and {a} times {n} is {a * n}.")
        elif kind == 4:
            lines.append(f"{n}号链接是{zc}{zp}，库存还剩{m}件，{rng.choice(SIZES)}码最受欢迎。")
            lines.append(f"Link {n} is the {ec} {ep}, {m} left in stock, size {rng.choice(SIZES)} sells best.")
        else:
            lines.append(f"订单{_order_id(rng)}已从{zcity}发出，预计{n}天内送达。")
            lines.append(f"Order {_order_id(rng)} left {ecity} and should arrive within {n} days.")
    lines.extend(JSON_PUNCTUATION_LINES)
    rng.shuffle(lines)
    return lines


def build_demo_corpus(demo: list[dict], seed: int = SEED) -> str:
    """Every message of the demo set (one per line) followed by extra original sentences."""
    rng = random.Random(seed + 2)
    lines = [m["content"].replace("\n", " ") for rec in demo for m in rec["messages"]]
    lines.extend(_corpus_extra_lines(rng))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# General-ability probe
# ----------------------------------------------------------------------------------------------

PROBE_CATEGORIES = ("arithmetic", "reading", "commonsense", "string", "multiple_choice", "logic")
PROBE_PER_LANG = 25  # per category and language -> 6 x 50 = 300

ZH_NUM_ONLY = "只回答数字。"
EN_NUM_ONLY = "Answer with a number only."


def _arith_expr(rng: random.Random, kind: int) -> str:
    if kind == 0:
        return f"{rng.randint(10, 999)} + {rng.randint(10, 999)}"
    if kind == 1:
        a, b = sorted((rng.randint(10, 999), rng.randint(10, 999)), reverse=True)
        return f"{a} - {b}"
    if kind == 2:
        return f"{rng.randint(2, 99)} × {rng.randint(2, 20)}"
    if kind == 3:
        b = rng.randint(2, 12)
        return f"{b * rng.randint(2, 30)} ÷ {b}"
    if kind == 4:
        return f"{rng.randint(2, 50)} + {rng.randint(2, 20)} × {rng.randint(2, 9)}"
    return f"({rng.randint(2, 30)} + {rng.randint(2, 30)}) × {rng.randint(2, 9)}"


def eval_arith(expr: str) -> int:
    """Evaluate the tiny expression language of the probe (integers, + - × ÷, parentheses) exactly."""
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unexpected expression: {expr!r}")

    value = ev(ast.parse(expr.replace("×", "*").replace("÷", "/"), mode="eval").body)
    if value.denominator != 1:
        raise ValueError(f"non-integer result: {expr!r}")
    return int(value)


def probe_arithmetic(rng: random.Random, lang: str, i: int) -> tuple[str, str]:
    expr = _arith_expr(rng, i % 6)
    answer = str(eval_arith(expr))
    if lang == "zh":
        return f"计算：{expr} 等于多少？{ZH_NUM_ONLY}", answer
    return f"What is {expr}? {EN_NUM_ONLY}", answer


# Reading comprehension: passage templates; every answer is a slot value that appears in the passage.
EN_READING = (
    ("{name} works at a bakery in {city}. Every morning {name} starts work at {hour} o'clock and bakes {n} loaves "
     "of bread.",
     (("In which city is the bakery?", "city"), ("How many loaves of bread does {name} bake?", "n"))),
    ("{name} has a pet {animal} called {pet}. The {animal} is {age} years old and likes to sleep by the window.",
     (("What kind of animal is {pet}?", "animal"), ("What is the name of the pet?", "pet"),
      ("How old is the pet?", "age"))),
    ("In {month}, {name} read a book about {topic}. It had {pages} pages, and {name} finished it in {days} days.",
     (("What was the book about?", "topic"), ("How many pages did the book have?", "pages"),
      ("In which month did {name} read the book?", "month"))),
    ("The school library opens at {hour} o'clock on weekdays. Students may borrow up to {books} books at a time and "
     "keep them for {days} days.",
     (("How many books may a student borrow at a time?", "books"),
      ("For how many days can the books be kept?", "days"))),
    ("{name} planted {seeds} {plant} seeds in the garden. After {weeks} weeks, the first green leaves appeared.",
     (("What kind of seeds did {name} plant?", "plant"), ("After how many weeks did the leaves appear?", "weeks"))),
    ("A small shop in {city} sells {item}. On {day}, the shop sold {n} of them, which was a new record.",
     (("On which day did the shop set a record?", "day"), ("What does the shop sell?", "item"),
      ("In which city is the shop?", "city"))),
    ("{name} and {name2} went to a concert on {day}. The concert started at {hour} o'clock and lasted {dur} hours.",
     (("Who went to the concert with {name}?", "name2"), ("At what hour did the concert start?", "hour"))),
    ("The {color} bus to {city} leaves the station at {hour} o'clock. The trip takes {dur} hours and a ticket costs "
     "{price} dollars.",
     (("How much does a ticket cost in dollars?", "price"), ("What colour is the bus?", "color"),
      ("Where does the bus go?", "city"))),
)

ZH_READING = (
    ("{name}在{city}的一家面包店工作，每天早上{hour}点开始上班，要烤{n}个面包。",
     (("面包店在哪座城市？", "city"), ("{name}每天要烤多少个面包？", "n"))),
    ("{name}养了一只{animal}，名字叫{pet}，今年{age}岁，最喜欢在窗边睡觉。",
     (("{name}养的是什么动物？", "animal"), ("这只宠物叫什么名字？", "pet"), ("这只宠物今年几岁？", "age"))),
    ("{month}，{name}读完了一本关于{topic}的书。这本书有{pages}页，{name}用了{days}天读完。",
     (("这本书是关于什么的？", "topic"), ("这本书有多少页？", "pages"), ("{name}是在几月读这本书的？", "month"))),
    ("学校图书馆工作日早上{hour}点开门，每位学生一次最多可以借{books}本书，借期{days}天。",
     (("每位学生一次最多可以借几本书？", "books"), ("借期是多少天？", "days"))),
    ("{name}在花园里种了{seeds}颗{plant}种子，{weeks}周后长出了第一片绿叶。",
     (("{name}种的是什么种子？", "plant"), ("几周后长出了绿叶？", "weeks"))),
    ("{city}的一家小店专门卖{item}。{day}那天，小店卖出了{n}件，创下了新纪录。",
     (("小店在哪一天创下了纪录？", "day"), ("这家小店专门卖什么？", "item"), ("小店在哪座城市？", "city"))),
    ("{name}和{name2}{day}去听了一场音乐会。音乐会{hour}点开始，持续了{dur}个小时。",
     (("{name}和谁一起去听了音乐会？", "name2"), ("音乐会几点开始？", "hour"))),
    ("开往{city}的{color}大巴每天{hour}点从车站出发，路上要{dur}个小时，车票{price}元。",
     (("车票多少元？", "price"), ("大巴是什么颜色的？", "color"), ("这辆大巴开往哪里？", "city"))),
)

EN_READING_SLOTS = {
    "name": EN_NAMES,
    "animal": ("cat", "dog", "rabbit", "parrot", "hamster", "turtle"),
    "pet": ("Biscuit", "Pepper", "Mochi", "Luna", "Ziggy", "Coco"),
    "month": ("March", "April", "July", "September", "November"),
    "topic": ("volcanoes", "bees", "space travel", "ancient Rome", "the ocean", "trains"),
    "plant": ("sunflower", "tomato", "pumpkin", "bean", "carrot"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "item": ("umbrellas", "kites", "teapots", "scarves", "notebooks", "candles"),
    "color": ("red", "green", "blue", "yellow", "white"),
    "city": tuple(c[1] for c in CITIES),
}
ZH_READING_SLOTS = {
    "name": ZH_NAMES,
    "animal": ("猫", "狗", "兔子", "鹦鹉", "仓鼠", "乌龟"),
    "pet": ("豆豆", "团团", "花花", "球球", "毛毛", "乐乐"),
    "month": ("三月", "四月", "七月", "九月", "十一月"),
    "topic": ("火山", "蜜蜂", "太空旅行", "古代建筑", "海洋", "火车"),
    "plant": ("向日葵", "西红柿", "南瓜", "黄瓜", "胡萝卜"),
    "day": ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"),
    "item": ("雨伞", "风筝", "茶壶", "围巾", "笔记本", "蜡烛"),
    "color": ("红色", "绿色", "蓝色", "黄色", "白色"),
    "city": tuple(c[0] for c in CITIES),
}


READING_NUMBERS = {  # numeric slots and their ranges
    "hour": (6, 10), "n": (12, 90), "dur": (2, 5), "age": (1, 5), "pages": (120, 480), "days": (14, 30),
    "books": (2, 6), "seeds": (3, 12), "weeks": (2, 5), "price": (31, 99),
}


def probe_reading(rng: random.Random, lang: str, i: int) -> tuple[str, str]:
    zh = lang == "zh"
    templates = ZH_READING if zh else EN_READING
    slots_src = ZH_READING_SLOTS if zh else EN_READING_SLOTS
    passage_t, questions = templates[i % len(templates)]
    slots = {key: rng.choice(values) for key, values in slots_src.items()}
    slots["name"], slots["name2"] = rng.sample(slots_src["name"], 2)
    used = [key for key in READING_NUMBERS if "{" + key + "}" in passage_t]
    while True:  # numbers within one passage are all different, so every answer is unambiguous
        numbers = {key: str(rng.randint(*READING_NUMBERS[key])) for key in used}
        if len(set(numbers.values())) == len(numbers):
            break
    slots.update(numbers)
    passage = passage_t.format(**slots)
    question_t, key = questions[(i // len(templates)) % len(questions)]
    question = question_t.format(**slots)
    answer = slots[key]
    if zh:
        return f"阅读短文并回答问题，只回答原文中的词语或数字。\n短文：{passage}\n问题：{question}", answer
    return (f"Read the passage and answer the question with a word or number copied from it.\n"
            f"Passage: {passage}\nQuestion: {question}"), answer


# Commonsense facts: (question, answer). Only facts that are certain and have a single short answer.
EN_FACTS = (
    ("How many days are in a week? Answer with a number only.", "7"),
    ("How many months are in a year? Answer with a number only.", "12"),
    ("How many hours are in a day? Answer with a number only.", "24"),
    ("How many minutes are in an hour? Answer with a number only.", "60"),
    ("How many legs does a spider have? Answer with a number only.", "8"),
    ("How many legs does an insect have? Answer with a number only.", "6"),
    ("How many sides does a hexagon have? Answer with a number only.", "6"),
    ("How many days are in a leap year? Answer with a number only.", "366"),
    ("How many letters are in the English alphabet? Answer with a number only.", "26"),
    ("How many centimetres are in one metre? Answer with a number only.", "100"),
    ("At standard atmospheric pressure, what is the boiling point of water in degrees Celsius? "
     "Answer with a number only.", "100"),
    ("At standard atmospheric pressure, what is the freezing point of water in degrees Celsius? "
     "Answer with a number only.", "0"),
    ("How many planets are in the Solar System? Answer with a number only.", "8"),
    ("How many zeros are in one million written in digits? Answer with a number only.", "6"),
    ("What is the chemical symbol for gold? Answer with the symbol only.", "Au"),
    ("What is the chemical symbol for iron? Answer with the symbol only.", "Fe"),
    ("Which planet is known as the Red Planet? Answer with one word.", "Mars"),
    ("What is the largest planet in the Solar System? Answer with one word.", "Jupiter"),
    ("What is the largest ocean on Earth? Answer with one word.", "Pacific"),
    ("What is the capital of France? Answer with one word.", "Paris"),
    ("What is the capital of Japan? Answer with one word.", "Tokyo"),
    ("What is the capital of Canada? Answer with one word.", "Ottawa"),
    ("What is the capital of Australia? Answer with one word.", "Canberra"),
    ("On which continent is Kenya? Answer with one word.", "Africa"),
    ('Who wrote the play "Romeo and Juliet"? Answer with the surname only.', "Shakespeare"),
)

ZH_FACTS = (
    ("一周有几天？只回答数字。", "7"),
    ("一年有几个月？只回答数字。", "12"),
    ("一天有多少小时？只回答数字。", "24"),
    ("一小时有多少分钟？只回答数字。", "60"),
    ("一分钟有多少秒？只回答数字。", "60"),
    ("水在标准大气压下的沸点是多少摄氏度？只回答数字。", "100"),
    ("水在标准大气压下的冰点是多少摄氏度？只回答数字。", "0"),
    ("三角形有几条边？只回答数字。", "3"),
    ("六边形有几条边？只回答数字。", "6"),
    ("一米等于多少厘米？只回答数字。", "100"),
    ("一千克等于多少克？只回答数字。", "1000"),
    ("蜘蛛有几条腿？只回答数字。", "8"),
    ("昆虫有几条腿？只回答数字。", "6"),
    ("闰年有多少天？只回答数字。", "366"),
    ("平年的二月有多少天？只回答数字。", "28"),
    ("一打是多少个？只回答数字。", "12"),
    ("一个世纪是多少年？只回答数字。", "100"),
    ("太阳系有几颗行星？只回答数字。", "8"),
    ("中国的首都是哪座城市？只回答城市名。", "北京"),
    ("日本的首都是哪座城市？只回答城市名。", "东京"),
    ("法国的首都是哪座城市？只回答城市名。", "巴黎"),
    ("太阳系中最大的行星是哪一颗？只回答行星名。", "木星"),
    ("被称为“红色星球”的是哪颗行星？只回答行星名。", "火星"),
    ("地球上面积最大的大洋是哪个？只回答名称。", "太平洋"),
    ("中国农历新年又叫什么节？只回答节日名。", "春节"),
)

EN_WORDS = ("garden", "market", "banana", "window", "pencil", "rocket", "planet", "silver", "orange", "yellow",
            "button", "candle", "forest", "letter", "summer", "winter", "basket", "coffee", "rabbit", "puzzle",
            "mirror", "pepper", "ticket", "bottle", "guitar", "island", "jacket", "kitten", "ladder", "office")
ZH_PHRASES = ("今天天气很好", "我喜欢吃苹果", "明天去图书馆", "春天来了", "一起去看电影吧", "妈妈在做饭",
              "小猫在睡觉", "这本书很有趣", "我们去公园散步", "窗外下雨了")


def probe_string(rng: random.Random, lang: str, i: int) -> tuple[str, str]:
    zh = lang == "zh"
    word = rng.choice(EN_WORDS)
    kind = i % 5
    if kind == 0:
        answer = word[::-1]
        q = (f"把英文单词 {word} 的字母倒过来写，只回答结果。" if zh
             else f"Reverse the letters of the word '{word}'. Answer with the result only.")
    elif kind == 1:
        answer = str(len(word))
        q = (f"英文单词 {word} 有几个字母？{ZH_NUM_ONLY}" if zh
             else f"How many letters are in the word '{word}'? {EN_NUM_ONLY}")
    elif kind == 2:
        letter = rng.choice(word)
        answer = str(word.count(letter))
        q = (f"字母 {letter} 在单词 {word} 中出现了几次？{ZH_NUM_ONLY}" if zh
             else f"How many times does the letter '{letter}' appear in the word '{word}'? {EN_NUM_ONLY}")
    elif kind == 3:
        answer = word.upper()
        q = (f"把单词 {word} 全部改成大写字母，只回答结果。" if zh
             else f"Write the word '{word}' in uppercase letters. Answer with the result only.")
    elif zh:
        phrase = rng.choice(ZH_PHRASES)
        answer = str(len(phrase))
        q = f"“{phrase}”一共有几个汉字？{ZH_NUM_ONLY}"
    else:
        answer = word[-1]
        q = f"What is the last letter of the word '{word}'? Answer with the letter only."
    return q, answer


# Multiple choice, hand-written: (question, correct option, three wrong options).
EN_MC = (
    ("Which of these animals is a mammal?", "whale", ("shark", "trout", "octopus")),
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Earth", "Mars")),
    ("Which month has the fewest days?", "February", ("March", "July", "October")),
    ("What is the opposite of 'hot'?", "cold", ("warm", "spicy", "bright")),
    ("Which of these is a vegetable?", "carrot", ("apple", "banana", "grape")),
    ("In which direction does the Sun rise?", "east", ("west", "north", "south")),
    ("Which tool is used to measure temperature?", "thermometer", ("ruler", "compass", "stopwatch")),
    ("What do bees make?", "honey", ("milk", "silk", "wool")),
    ("Which of these metals is liquid at room temperature?", "mercury", ("iron", "copper", "aluminium")),
    ("Which shape has four equal sides and four right angles?", "square", ("triangle", "circle", "pentagon")),
    ("Which of these birds can fly?", "eagle", ("penguin", "ostrich", "emu")),
    ("Which of these is the capital of Italy?", "Rome", ("Milan", "Venice", "Naples")),
)
ZH_MC = (
    ("下列哪种动物是哺乳动物？", "鲸鱼", ("鲨鱼", "金鱼", "章鱼")),
    ("离太阳最近的行星是哪一颗？", "水星", ("金星", "地球", "火星")),
    ("一年中天数最少的月份是哪个月？", "二月", ("三月", "七月", "十月")),
    ("“热”的反义词是什么？", "冷", ("暖", "辣", "亮")),
    ("下列哪一个是蔬菜？", "胡萝卜", ("苹果", "香蕉", "葡萄")),
    ("太阳从哪个方向升起？", "东方", ("西方", "北方", "南方")),
    ("测量体温用什么工具？", "体温计", ("尺子", "指南针", "秒表")),
    ("蜜蜂酿造的是什么？", "蜂蜜", ("牛奶", "蚕丝", "羊毛")),
    ("下列哪种金属在常温下是液体？", "汞", ("铁", "铜", "铝")),
    ("四条边相等且四个角都是直角的图形是什么？", "正方形", ("三角形", "圆形", "五边形")),
    ("下列哪种鸟会飞？", "老鹰", ("企鹅", "鸵鸟", "鸸鹋")),
    ("下列哪个城市是中国的首都？", "北京", ("上海", "广州", "深圳")),
)
LETTERS = "ABCD"


def _format_mc(question: str, options: list[str], zh: bool) -> str:
    lines = [question] + [f"{LETTERS[k]}. {opt}" for k, opt in enumerate(options)]
    lines.append("只回答选项字母。" if zh else "Answer with the letter only.")
    return "\n".join(lines)


def probe_multiple_choice(rng: random.Random, lang: str, i: int) -> tuple[str, str]:
    zh = lang == "zh"
    bank = ZH_MC if zh else EN_MC
    if i < len(bank):
        question, correct, wrong = bank[i]
        options = [correct, *wrong]
        rng.shuffle(options)
        return _format_mc(question, options, zh), LETTERS[options.index(correct)]
    # Generated: largest / smallest of four distinct numbers.
    numbers = rng.sample(range(10, 1000), 4)
    want_max = i % 2 == 0
    if zh:
        question = "下列哪个数最大？" if want_max else "下列哪个数最小？"
    else:
        question = "Which number is the largest?" if want_max else "Which number is the smallest?"
    target = max(numbers) if want_max else min(numbers)
    return _format_mc(question, [str(x) for x in numbers], zh), LETTERS[numbers.index(target)]


EN_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ZH_WEEKDAYS = ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日")


def probe_logic(rng: random.Random, lang: str, i: int) -> tuple[str, str]:
    zh = lang == "zh"
    kind = i % 4
    if kind == 0:  # ordering by height, statements in random order
        people = rng.sample(ZH_NAMES if zh else EN_NAMES, 3)  # tallest first
        pairs = [(people[0], people[1]), (people[1], people[2])]
        rng.shuffle(pairs)
        ask_tallest = rng.random() < 0.5
        answer = people[0] if ask_tallest else people[2]
        if zh:
            facts = "".join(f"{a}比{b}高。" for a, b in pairs)
            return f"{facts}谁最{'高' if ask_tallest else '矮'}？只回答名字。", answer
        facts = " ".join(f"{a} is taller than {b}." for a, b in pairs)
        return f"{facts} Who is the {'tallest' if ask_tallest else 'shortest'}? Answer with a name only.", answer
    if kind == 1:  # arithmetic sequence
        start, step = rng.randint(1, 20), rng.randint(2, 9)
        seq = [start + step * k for k in range(4)]
        answer = str(start + step * 4)
        shown = ", ".join(str(x) for x in seq)
        if zh:
            return f"数列 {shown} 的下一个数是多少？{ZH_NUM_ONLY}", answer
        return f"What comes next in the sequence {shown}? {EN_NUM_ONLY}", answer
    if kind == 2:  # weekday arithmetic
        today, offset = rng.randrange(7), rng.randint(1, 6)
        if zh:
            answer = ZH_WEEKDAYS[(today + offset) % 7]
            return f"如果今天是{ZH_WEEKDAYS[today]}，{offset}天后是星期几？只回答星期几。", answer
        answer = EN_WEEKDAYS[(today + offset) % 7]
        return f"If today is {EN_WEEKDAYS[today]}, what day is it in {offset} days? Answer with the day only.", answer
    numbers = rng.sample(range(1, 100), 4)  # sorting
    answer = ",".join(str(x) for x in sorted(numbers))
    shown = ", ".join(str(x) for x in numbers)
    if zh:
        return f"把这些数从小到大排列：{shown}。用英文逗号分隔，不加空格。", answer
    return f"Sort these numbers from smallest to largest: {shown}. Separate them with commas and no spaces.", answer


def probe_commonsense(rng: random.Random, lang: str, i: int) -> tuple[str, str]:
    del rng
    return (ZH_FACTS if lang == "zh" else EN_FACTS)[i]


PROBE_MAKERS = {
    "arithmetic": probe_arithmetic,
    "reading": probe_reading,
    "commonsense": probe_commonsense,
    "string": probe_string,
    "multiple_choice": probe_multiple_choice,
    "logic": probe_logic,
}


def build_general_probe(seed: int = SEED) -> list[dict]:
    rng = random.Random(seed + 1)
    items: list[dict] = []
    seen: set[str] = set()
    for category in PROBE_CATEGORIES:
        make = PROBE_MAKERS[category]
        for lang in ("zh", "en"):
            for i in range(PROBE_PER_LANG):
                for _ in range(1000):
                    question, answer = make(rng, lang, i)
                    if question not in seen:
                        break
                else:  # pragma: no cover
                    raise RuntimeError(f"could not draw a unique {category} question")
                seen.add(question)
                items.append({"messages": [_user(question), _assistant(answer)], "category": category})
    rng.shuffle(items)
    return items


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)


def generate(seed: int = SEED) -> dict[str, str]:
    """Return {file name: file content} for all bundled data files (pure, no I/O)."""
    demo = build_demo_sft(seed)
    return {
        DEMO_SFT: _jsonl(demo),
        DEMO_CORPUS: build_demo_corpus(demo, seed),
        GENERAL_PROBE: _jsonl(build_general_probe(seed)),
    }


def write(out_dir: Path, seed: int = SEED) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, content in generate(seed).items():
        path = out_dir / name
        path.write_bytes(content.encode("utf-8"))
        written[name] = path
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESOURCES_DIR, help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for name, path in write(args.out, args.seed).items():
        print(f"wrote {path} ({path.stat().st_size} bytes, {name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
