// Lint rules that catch what tsc does not: promises nobody awaits or handles (a storage engine must not lose
// an error), comma-operator expressions, and a few plain-JavaScript pitfalls. Run by scripts/test.sh.
import tseslint from 'typescript-eslint';

export default tseslint.config(
  { ignores: ['dist/**', 'native/**', 'node_modules/**', 'coverage/**'] },
  {
    files: ['src/**/*.ts', 'test/**/*.ts'],
    extends: [tseslint.configs.base],
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
    rules: {
      '@typescript-eslint/no-floating-promises': 'error',
      '@typescript-eslint/no-misused-promises': ['error', { checksVoidReturn: false }],
      'no-var': 'error',
      'prefer-const': 'error',
      eqeqeq: ['error', 'smart'],
      'no-control-regex': 'error',
    },
  },
  // The comma operator hides a second effect in an expression: not in the library (tests use it in
  // one-line fakes and callbacks, where the effect is the point).
  { files: ['src/**/*.ts'], rules: { 'no-sequences': 'error' } },
);
