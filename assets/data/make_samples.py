"""Generate the bundled sample datasets (Chinese, written for piccolo-jax) from word lists and templates.

    python assets/data/make_samples.py            # rewrites assets/data/{pretrain,finetune,hybrid}/*.jsonl

Deterministic (seeded), so the committed files are exactly this script's output (a test checks it).

pretrain/  pairs {"text", "text_pos"} (uniem format):
    city_facts.jsonl       questions and titles about Chinese cities -> a sentence answering them
    product_reviews.jsonl  review titles -> review bodies (some mixed Chinese/English)
    paraphrase.jsonl       sentence -> paraphrase (symmetric: use without instruction prefixes)
finetune/  with 2..7 hard negatives per query:
    city_qa.jsonl          uniem triplets {"text", "text_pos", "text_neg": [...]}
    concept_bge.jsonl      FlagEmbedding format {"query", "pos": [...], "neg": [...]}
hybrid/  the other task types of piccolo v2's hybrid training (with finetune/ for retrieval):
    sentence_similarity.jsonl  STS scored pairs {"text", "text_pair", "label": 0..5, "type": "cosent"}
    topic_classification.jsonl classification {"text", "text_pos": label, "text_neg": [other labels],
                               "type": "cls_contrast"}
    concept_scored.jsonl       BGE rows with teacher scores {"query", "pos", "neg", "pos_scores", "neg_scores"}
"""

from __future__ import annotations

import argparse
import json
import os
import random

# city, province ("" = municipality), signature food, landmark
CITIES = [
    ("北京", "", "北京烤鸭", "故宫"), ("上海", "", "小笼包", "外滩"),
    ("天津", "", "狗不理包子", "天津之眼"), ("重庆", "", "火锅", "洪崖洞"),
    ("广州", "广东省", "肠粉", "广州塔"), ("成都", "四川省", "担担面", "宽窄巷子"),
    ("西安", "陕西省", "肉夹馍", "兵马俑"), ("杭州", "浙江省", "西湖醋鱼", "西湖"),
    ("南京", "江苏省", "盐水鸭", "中山陵"), ("苏州", "江苏省", "松鼠桂鱼", "拙政园"),
    ("武汉", "湖北省", "热干面", "黄鹤楼"), ("长沙", "湖南省", "臭豆腐", "橘子洲"),
    ("兰州", "甘肃省", "牛肉面", "中山桥"), ("哈尔滨", "黑龙江省", "红肠", "中央大街"),
    ("桂林", "广西", "桂林米粉", "漓江"), ("昆明", "云南省", "过桥米线", "滇池"),
    ("厦门", "福建省", "沙茶面", "鼓浪屿"), ("青岛", "山东省", "海鲜", "栈桥"),
    ("济南", "山东省", "把子肉", "趵突泉"), ("拉萨", "西藏", "酥油茶", "布达拉宫"),
    ("乌鲁木齐", "新疆", "大盘鸡", "国际大巴扎"), ("开封", "河南省", "灌汤包", "清明上河园"),
    ("洛阳", "河南省", "洛阳水席", "龙门石窟"), ("扬州", "江苏省", "扬州炒饭", "瘦西湖"),
    ("绍兴", "浙江省", "黄酒", "鲁迅故里"), ("柳州", "广西", "螺蛳粉", "柳江"),
    ("南昌", "江西省", "南昌拌粉", "滕王阁"), ("福州", "福建省", "佛跳墙", "三坊七巷"),
    ("黄山", "安徽省", "臭鳜鱼", "黄山风景区"), ("大同", "山西省", "刀削面", "云冈石窟"),
    ("敦煌", "甘肃省", "驴肉黄面", "莫高窟"), ("沈阳", "辽宁省", "鸡架", "沈阳故宫"),
    ("大理", "云南省", "乳扇", "洱海"), ("潮州", "广东省", "牛肉丸", "广济桥"),
    ("无锡", "江苏省", "无锡排骨", "鼋头渚"), ("宁波", "浙江省", "宁波汤圆", "天一阁"),
]

PRODUCTS = ["手机", "笔记本电脑", "蓝牙耳机", "电饭煲", "空气净化器", "扫地机器人", "电动牙刷",
            "智能手表", "平板电脑", "显示器", "机械键盘", "无线鼠标", "吹风机", "洗衣机", "冰箱",
            "电热水壶", "台灯", "充电宝", "投影仪", "咖啡机"]
# aspect, good review, bad review
ASPECTS = [
    ("续航", "续航很长，充一次电能用两三天", "续航太短，半天就没电了"),
    ("做工", "做工精致，拿在手里很有质感", "做工粗糙，边缘还有毛刺"),
    ("价格", "性价比很高，这个价位很难找到更好的", "价格偏贵，同样的钱能买到更好的"),
    ("噪音", "运行的时候很安静，几乎听不到声音", "噪音太大，晚上根本没法用"),
    ("物流", "物流很快，下单第二天就送到了", "物流太慢，等了一个多星期才到"),
    ("售后", "客服很耐心，问题很快就解决了", "售后互相推诿，问题一直没解决"),
    ("连接", "连接 Wi-Fi 和蓝牙都很稳定，App 也好用", "经常连不上 Wi-Fi，App 还总是闪退"),
    ("充电", "支持 USB-C 快充，半小时能充到八成", "充电很慢，USB-C 接口还有点松"),
]

SUBJECTS = ["数学", "物理", "英语", "编程", "历史", "钢琴", "绘画", "摄影", "Python", "机器学习", "日语", "书法"]
PEOPLE = ["我哥哥", "小王", "李老师", "我们班", "妈妈", "张经理", "我的同事", "邻居家的孩子"]
PLACES = ["图书馆", "火车站", "医院", "公园", "超市", "机场", "博物馆", "银行", "体育馆", "电影院"]
DISHES = [("面馆", "牛肉面"), ("饺子馆", "饺子"), ("烧烤店", "烤串"), ("甜品店", "蛋糕"), ("茶餐厅", "菠萝包"),
          ("火锅店", "毛肚"), ("早餐店", "豆浆油条"), ("川菜馆", "水煮鱼")]
WEATHER = [("很好", "不错"), ("很热", "特别炎热"), ("很冷", "非常寒冷"), ("有点闷", "比较闷热"),
           ("阴沉沉的", "一直阴着")]

# field -> (concept, definition)
CONCEPTS = {
    "生物": [("光合作用", "绿色植物利用光能把二氧化碳和水合成有机物并释放氧气的过程"),
           ("细胞分裂", "一个细胞分成两个细胞的过程，是生物生长和繁殖的基础"),
           ("基因", "带有遗传信息的DNA片段，决定生物的性状"),
           ("蛋白质", "由氨基酸连接而成的大分子，是构成细胞的主要物质"),
           ("免疫", "身体识别并清除病原体等异物的保护机制"),
           ("进化", "生物种群的遗传特征在世代之间逐渐变化的过程"),
           ("生态系统", "一定区域内的生物和它们所处环境相互作用形成的整体"),
           ("酶", "能加快生物体内化学反应速度的蛋白质催化剂")],
    "物理": [("惯性", "物体保持原来静止或匀速直线运动状态的性质"),
           ("重力", "由于地球吸引而使物体受到的力"),
           ("摩擦力", "两个相互接触的物体相对运动时在接触面上产生的阻碍运动的力"),
           ("电流", "电荷的定向移动，单位是安培"),
           ("电压", "推动电荷定向移动形成电流的原因，单位是伏特"),
           ("折射", "光从一种介质斜射入另一种介质时传播方向发生改变的现象"),
           ("声波", "声音在空气等介质中以振动形式传播的波"),
           ("能量守恒", "能量既不会凭空产生也不会凭空消失，只会从一种形式转化为另一种形式")],
    "化学": [("氧化反应", "物质与氧发生的化学反应，例如燃烧和生锈"),
           ("催化剂", "能改变化学反应速率而自身质量和化学性质在反应前后不变的物质"),
           ("酸碱中和", "酸和碱反应生成盐和水的反应"),
           ("分子", "保持物质化学性质的最小粒子"),
           ("原子", "化学变化中的最小粒子，由原子核和核外电子构成"),
           ("化合物", "由两种或两种以上元素组成的纯净物"),
           ("溶解", "一种物质均匀分散到另一种物质中形成溶液的过程"),
           ("同位素", "质子数相同而中子数不同的同一元素的不同原子")],
    "计算机": [("算法", "解决问题的一系列明确步骤，可以被计算机执行"),
            ("操作系统", "管理计算机硬件和软件资源、为程序提供运行环境的系统软件"),
            ("数据库", "按照一定结构组织、存储和管理数据的仓库"),
            ("编译器", "把高级语言写的源代码翻译成机器能执行的代码的程序"),
            ("神经网络", "模仿生物神经元连接方式、通过大量参数从数据中学习的计算模型"),
            ("哈希表", "根据键的哈希值直接定位存储位置、可以快速查找数据的数据结构"),
            ("递归", "函数在定义中直接或间接调用自身的方法"),
            ("云计算", "通过网络按需使用远程服务器上的计算和存储资源的方式")],
    "经济": [("通货膨胀", "一段时间内物价水平持续普遍上涨、货币购买力下降的现象"),
           ("国内生产总值", "一个国家在一定时期内生产的全部最终产品和服务的市场价值，简称GDP"),
           ("供求关系", "商品的供给和需求之间的关系，它影响商品的价格"),
           ("利率", "一定时期内利息与本金的比率"),
           ("股票", "股份公司发给股东证明其所持股份的凭证"),
           ("汇率", "一种货币兑换另一种货币的比价"),
           ("机会成本", "为了得到某种东西而放弃的其他选择中价值最高的那一个"),
           ("边际效用", "每多消费一单位商品所增加的满足感")],
    "地理": [("季风", "随季节改变方向的风，冬夏风向大致相反"),
           ("板块运动", "地球岩石圈各个板块之间的相对移动"),
           ("经度", "地球上某点所在经线与本初子午线之间的角度"),
           ("纬度", "地球上某点与赤道之间的角度距离"),
           ("洋流", "海洋中大规模、沿一定方向流动的海水"),
           ("三角洲", "河流入海或入湖处泥沙堆积形成的平原"),
           ("冰川", "由积雪长期压实形成、能缓慢流动的巨大冰体"),
           ("气候", "一个地区多年天气的平均状况和变化特征")],
}


def _city(c):
    return f"{c[1]}{c[0]}" if c[1] else c[0]


def city_facts(rng):
    templates = [
        ("{c}有什么好吃的", "来到{c}，一定要尝尝当地的{f}。"),
        ("{c}美食推荐", "{f}是{c}最有代表性的风味之一。"),
        ("{c}的特色小吃", "说到{c}的特色小吃，很多人第一个想到的就是{f}。"),
        ("{f}是哪里的特产", "{f}是{c}的著名美食。"),
        ("在哪里能吃到正宗的{f}", "想吃正宗的{f}，最好去{c}。"),
        ("{c}旅游攻略", "去{c}旅游，{l}是必去的地方。"),
        ("{c}有哪些景点", "{c}最有名的景点是{l}。"),
        ("{l}在哪里", "{l}坐落在{full}。"),
        ("{l}在哪个城市", "{l}位于{c}。"),
        ("周末去{c}玩什么", "周末到{c}，可以先逛{l}，再吃一顿{f}。"),
        ("{c}一日游路线", "上午参观{l}，中午品尝{f}，是{c}一日游的经典路线。"),
        ("{c}属于哪个省", "{c}是{p}的城市。"),
        ("{c}的地理位置", "{c}位于{p}。"),
        ("第一次去{c}要注意什么", "第一次去{c}，别错过{l}，也别忘了尝尝{f}。"),
        ("{c}印象", "提起{c}，人们会想到{l}和{f}。"),
        ("{c}的名片", "{l}是{c}的一张城市名片。"),
        ("游客在{c}必做的事", "在{c}，游客必做的事是游览{l}。"),
        ("{c}人早餐吃什么", "不少{c}人喜欢用{f}开启新的一天。"),
    ]
    rows = []
    for city in CITIES:
        c, p, f, sight = city
        for q, a in templates:
            if "{p}" in q + a and not p:
                a = a.replace("是{p}的城市", "是直辖市").replace("位于{p}", "是中国的直辖市之一")
            rows.append({"text": q.format(c=c, p=p, f=f, l=sight, full=_city(city)),
                         "text_pos": a.format(c=c, p=p, f=f, l=sight, full=_city(city))})
    rng.shuffle(rows)
    return rows


def product_reviews(rng):
    titles = ["{p}的{a}怎么样", "评价：{p}{a}", "{p}{a}体验分享", "说说这台{p}的{a}", "{p}买了一个月，{a}如何"]
    rows = []
    for product in PRODUCTS:
        for aspect, good, bad in ASPECTS:
            first, second = rng.sample(titles, 2)  # distinct titles for the good and the bad review
            for sentiment, body, title in (("好评", good, first), ("差评", bad, second)):
                labelled = rng.choice(titles).format(p=product, a=aspect)
                rows.append({"text": f"{labelled}（{sentiment}）", "text_pos": f"这款{product}{body}。"})
                rows.append({"text": title.format(p=product, a=aspect), "text_pos": f"买了这款{product}，{body}。"})
    rng.shuffle(rows)
    return rows


def paraphrase(rng):
    pairs = []
    for s in SUBJECTS:
        for who in PEOPLE:
            pairs.append((f"{who}想学习{s}", f"{who}打算学{s}"))
    for who in PEOPLE:
        for place in PLACES:
            pairs.append((f"{who}明天去{place}", f"明天{who}要去{place}"))
            pairs.append((f"请问去{place}怎么走", f"去{place}的路怎么走"))
    for shop, dish in DISHES:
        for who in PEOPLE:
            pairs.append((f"{who}说这家{shop}的{dish}很好吃", f"{who}觉得这家{shop}做的{dish}味道不错"))
    for a, b in WEATHER:
        for place in PLACES:
            pairs.append((f"今天{place}附近的天气{a}", f"{place}那边今天天气{b}"))
    unique = sorted(set(pairs))
    rng.shuffle(unique)
    return [{"text": a, "text_pos": b} if rng.random() < 0.5 else {"text": b, "text_pos": a} for a, b in unique]


def city_qa(rng):
    # kind -> [(question, answer)]; answers use fields of CITIES: {c} city, {p} province, {f} food, {l} sight
    templates = {
        "food": [("{c}最有名的小吃是什么？", "{c}最有名的小吃是{f}。"), ("去{c}应该吃什么？", "去{c}一定要吃{f}。"),
                 ("{c}有什么特色美食", "{c}的特色美食有{f}。"), ("{c}的招牌美食是哪道", "{c}的招牌美食是{f}。"),
                 ("到了{c}吃点什么好", "到了{c}，可以吃{f}。"), ("{c}本地人推荐的美食", "{c}本地人最推荐{f}。")],
        "sight": [("{c}最著名的景点是哪里？", "{c}最著名的景点是{l}。"), ("去{c}必看的地方", "去{c}必看{l}。"),
                  ("{c}有什么值得一去的景点", "{c}值得一去的景点是{l}。"), ("{c}的地标是什么", "{c}的地标是{l}。"),
                  ("{c}哪里最适合拍照", "在{c}，{l}最适合拍照。"), ("带孩子去{c}逛哪里", "带孩子去{c}，可以逛{l}。")],
        "province": [("{c}在哪个省？", "{c}在{p}。"), ("{c}属于哪里", "{c}属于{p}。"),
                     ("{c}是哪个省份的城市", "{c}是{p}的城市。")],
    }

    # hard negatives state the same kind of fact about another city, in phrasings that no positive uses,
    # so that no hard negative is another row's positive (which would be a false negative in a batch)
    negative_phrasings = {
        "food": ["说到{c}的美食，当地人会推荐{f}。", "{c}的美食名片是{f}。"],
        "sight": ["说到{c}的景点，当地人会推荐{l}。", "{c}的旅游名片是{l}。"],
        "province": ["从行政区划看，{c}隶属{p}。", "{c}这座城市归{p}管辖。"],
    }

    def fill(text, city):
        if not city[1]:  # municipalities belong to no province
            text = (text.replace("在{p}", "是直辖市，不属于任何省").replace("属于{p}", "属于直辖市")
                    .replace("是{p}的城市", "是一座直辖市").replace("隶属{p}", "是直辖市")
                    .replace("归{p}管辖", "是直辖市"))
        return text.format(c=city[0], p=city[1], f=city[2], l=city[3])

    rows = []
    for city in CITIES:
        for kind, pairs in templates.items():
            others = [o for o in CITIES if o is not city and (kind != "province" or o[1] != city[1])]
            for question, answer in pairs:
                negatives = [fill(rng.choice(negative_phrasings[kind]), o)
                             for o in rng.sample(others, rng.randint(2, 7))]
                rows.append({"text": fill(question, city), "text_pos": fill(answer, city), "text_neg": negatives})
    rng.shuffle(rows)
    return rows


def concept_bge(rng):
    queries = ["什么是{c}？", "{c}是什么意思", "请解释一下{c}", "{c}的定义", "简单介绍{c}", "{c}指的是什么",
               "怎么理解{c}", "{c}的含义是什么", "科普：{c}", "{c}通俗解释"]
    # one positive phrasing per query template, and a second one for rows with two positives
    first = ["{c}是指{d}。", "{d}，这在{field}中叫作{c}。", "所谓{c}，就是{d}。", "在{field}里，{c}指的是{d}。",
             "{c}：{d}。", "简单来说，{c}就是{d}。", "我们把{d}称为{c}。", "{c}的意思是{d}。",
             "{field}概念“{c}”：{d}。", "通俗地讲，{c}是{d}。"]
    second = ["【{field}】{c}——{d}。", "{c}（{field}）：{d}。", "{c}这个词说的是{d}。", "关于{c}：{d}。",
              "{field}课本上说，{c}是{d}。", "{c}可以理解为{d}。", "名词解释：{c}，{d}。", "{d}——这就是{c}。",
              "学{field}时会学到{c}，它是{d}。", "一句话说清{c}：{d}。"]
    # hard negatives define another concept of the same field, in phrasings that no positive uses
    negative = ["{c}，即{d}。", "术语{c}表示{d}。", "{field}中的{c}一词，描述的是{d}。"]
    rows = []
    for field, concepts in CONCEPTS.items():
        for concept, definition in concepts:
            others = [(c, d) for c, d in concepts if c != concept]
            for i, template in enumerate(queries):
                pos = [first[i], second[i]][:rng.randint(1, 2)]
                negatives = [rng.choice(negative).format(c=c, d=d, field=field)
                             for c, d in rng.sample(others, rng.randint(2, 7))]
                rows.append({"query": template.format(c=concept),
                             "pos": [p.format(c=concept, d=definition, field=field) for p in pos],
                             "neg": negatives})
    rng.shuffle(rows)
    return rows


def sentence_similarity(rng):
    """Graded pairs: 5 the same statement reworded, 3 the same plan on another day, 2 the same person going
    somewhere else, 1 another person at the same place, 0 an unrelated sentence."""
    days = ["明天", "后天", "周末", "下周一"]
    rows = []
    for who in PEOPLE:
        for place in PLACES:
            day, other_day = rng.sample(days, 2)
            other_place = rng.choice([p for p in PLACES if p != place])
            other_who = rng.choice([p for p in PEOPLE if p != who])
            text = f"{who}{day}去{place}"
            subject, (shop, dish) = rng.choice(SUBJECTS), rng.choice(DISHES)
            for pair, label in ((f"{day}{who}要去{place}", 5), (f"{who}{other_day}去{place}", 3),
                                (f"{who}{day}去{other_place}", 2), (f"{other_who}{day}在{place}", 1),
                                (rng.choice([f"{other_who}在学{subject}", f"这家{shop}的{dish}很好吃"]), 0)):
                rows.append({"text": text, "text_pair": pair, "label": label, "type": "cosent"})
    rng.shuffle(rows)
    return rows


TOPICS = ("美食", "旅游", "数码产品", "学习", "天气", "科学")


def topic_classification(rng):
    """Texts labelled with their topic: the positive is the topic's name, the negatives the other topics'
    (piccolo v2's classification triplets: rows share labels, so other rows are never negatives)."""
    texts = {"美食": [], "旅游": [], "数码产品": [], "学习": [], "天气": [], "科学": []}
    for c, _, food, sight in CITIES:
        texts["美食"] += [f"{c}的{food}真的太好吃了", f"推荐大家去{c}尝一尝{food}"]
        texts["旅游"] += [f"这次去{c}玩，参观了{sight}", f"{sight}的风景让人难忘"]
    for product in PRODUCTS:
        aspect, good, _ = rng.choice(ASPECTS)
        texts["数码产品"] += [f"新买的{product}{good}", f"这台{product}的{aspect}怎么样"]
    for subject in SUBJECTS:
        texts["学习"] += [f"每天坚持学习{subject}一小时", f"{subject}考试终于通过了"]
    for place in PLACES:
        for good, more in WEATHER[:2]:
            texts["天气"].append(f"今天{place}附近天气{good}")
        texts["天气"].append(f"{place}这边下了一整天的雨")
    for field, concepts in CONCEPTS.items():
        for concept, _ in concepts[:5]:
            texts["科学"].append(f"{field}课上老师讲了{concept}")
    rows = []
    for topic, items in texts.items():
        for text in sorted(set(items)):
            others = [t for t in TOPICS if t != topic]
            rows.append({"text": text, "text_pos": topic, "text_neg": rng.sample(others, rng.randint(3, 5)),
                         "type": "cls_contrast"})
    rng.shuffle(rows)
    return rows


def concept_scored(rng):
    """BGE rows with teacher (reranker) scores, one per passage: the positive scores highest, the hard
    negatives (other concepts of the same field) lower, as a cross-encoder's logits would."""
    queries = ["{c}是怎么回事", "帮我解释{c}这个概念", "{c}到底指什么", "用一句话说明{c}", "{c}是啥"]
    rows = []
    for field, concepts in CONCEPTS.items():
        for concept, definition in concepts:
            others = [(c, d) for c, d in concepts if c != concept]
            for template in queries:
                negatives = rng.sample(others, rng.randint(2, 6))
                rows.append({"query": template.format(c=concept), "pos": [f"{field}里的{concept}：{definition}。"],
                             "neg": [f"{field}中，{c}是{d}。" for c, d in negatives],
                             "pos_scores": [round(rng.uniform(6.0, 9.0), 2)],
                             "neg_scores": [round(rng.uniform(-3.0, 4.0), 2) for _ in negatives]})
    rng.shuffle(rows)
    return rows


DATASETS = {
    "pretrain/city_facts.jsonl": city_facts, "pretrain/product_reviews.jsonl": product_reviews,
    "pretrain/paraphrase.jsonl": paraphrase, "finetune/city_qa.jsonl": city_qa,
    "finetune/concept_bge.jsonl": concept_bge,
    "hybrid/sentence_similarity.jsonl": sentence_similarity, "hybrid/topic_classification.jsonl": topic_classification,
    "hybrid/concept_scored.jsonl": concept_scored,
}


def write_all(out_dir: str, seed: int = 20240101) -> dict[str, int]:
    """Write every dataset under out_dir; returns rows per file."""
    counts = {}
    for i, (rel, make) in enumerate(DATASETS.items()):
        rows = make(random.Random(seed + i))
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts[rel] = len(rows)
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)), help="output directory")
    args = parser.parse_args()
    for rel, n in write_all(args.out).items():
        print(f"{rel}: {n} rows")
