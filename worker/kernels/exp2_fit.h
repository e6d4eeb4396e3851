// The polynomial every kernel's e^x is built on: a degree-5 fit to 2^f on [-0.5, 0.5], highest degree first (relative
// error 1.5e-7 with these float32 coefficients, as the degree-6 Taylor series of e^f it replaced, one FMA and a
// multiply fewer once e^x is 2^(x log2(e))).
#pragma once

constexpr float LOG2_E = 1.44269504f;
constexpr int EXP2_DEGREE = 5;
constexpr float EXP2_FIT[EXP2_DEGREE + 1] = {0.001327647129073739f, 0.009675540961325169f, 0.05550713092088699f,
                                             0.24022120237350464f,  0.6931469440460205f,   1.0000001192092896f};
