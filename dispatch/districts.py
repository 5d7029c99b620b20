"""Wenzhou's districts and counties, as the 2018 plan's task allocation names them."""

# name -> terminals allocated for severely disabled subscribers (attachment 3)
DISTRICTS: dict[str, int] = {
    "鹿城区": 2150,
    "瓯海区": 1310,
    "龙湾区": 880,
    "经济开发区": 330,
    "洞头区": 450,
    "瑞安市": 3210,
    "乐清市": 1840,
    "永嘉县": 3160,
    "平阳县": 1290,
    "苍南县": 3950,
    "文成县": 450,
    "泰顺县": 1180,
}
